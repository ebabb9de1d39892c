"""Checks and times the Pallas kernels against the XLA reference path and jax's own kernels.

On a GPU (Llama-3.1-8B shapes: 32 query heads, 8 kv heads, head_dim 128, hidden 4096,
intermediate 14336, bfloat16; LoRA rank 16 over 4 adapter slots):

- **ragged paged attention** (decode rows, prefill chunks, a mixed step): our kernel vs
  the jnp reference under XLA, jax's Pallas GPU decode kernel
  ``jax.experimental.pallas.ops.gpu.paged_attention`` (decode only; its pages are
  ``[Hkv, P, page, Dh]``, transposed once outside the timing) and cuDNN
  ``jax.nn.dot_product_attention(implementation="cudnn")`` where a dense form exists
  (decode over pre-gathered K/V, equal-length prefill from position 0);
- **dense causal attention forward + backward** (the finetuning backward pieces): our
  flash pair vs XLA dense, XLA query-blocked (what the step uses without kernels) and cuDNN;
- **multi-LoRA** (forward and forward + backward): grouped kernels (tokens grouped once,
  as a step does) vs the one-hot reference and ``lax.ragged_dot``.

Every implementation's output is checked against the XLA reference (max abs error over
the reference's max magnitude) before it is timed; times are medians of ``--repeats``
runs after a warm-up. The table is printed and appended to BENCHMARKS.md (``--no-record``
to skip).

Without a GPU it runs a tiny correctness check of every kernel in Pallas interpret mode
on CPU (timings there mean nothing) and says so.

    python bench/kernels.py                  # GPU: full table; CPU: tiny interpret check
    python bench/kernels.py --quick --no-record
    python bench/kernels.py --dry-run        # the GPU cases' code at tiny sizes on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO_ROOT)

from pallas_kernels.lora import (  # noqa: E402
    group_tokens,
    lora_grouped,
    lora_multi_slot_reference,
    lora_ragged_dot,
)
from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    dense_causal_attention_reference,
    flash_causal_attention,
    ragged_attention_metadata,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    split_kv,
)
from pallas_kernels.ragged_paged_attention.kernel import (  # noqa: E402
    default_block_q,
    default_pages_per_block,
)

from benchlib import record  # noqa: E402  (bench/ is on sys.path when run as a script)

LORA_RANK, LORA_SLOTS = 16, 4
PAGE_SIZE = 16

Row = list[str]


# ---------------------------------------------------------------------------- helpers


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def tree_rel_err(out, ref) -> float:
    return max(rel_err(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref),
                                             strict=True))


def time_ms(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in ms (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def markdown_table(header: list[str], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Bench:
    """Collects rows: each implementation checked against the reference, then timed."""

    def __init__(self, repeats: int, tol: float):
        self.repeats, self.tol, self.rows = repeats, tol, []

    def case(self, name: str, impls: dict[str, tuple[Callable, tuple] | str],
             reference: str = "XLA reference") -> None:
        ref_out, ref_ms = None, None
        for impl, spec in impls.items():
            if isinstance(spec, str):  # not applicable here, with the reason
                self.rows.append([name, impl, "n/a", "", spec])
                continue
            fn, args = spec
            try:
                out = jax.block_until_ready(fn(*args))
                if impl == reference:
                    ref_out = out
                err = 0.0 if ref_out is None or impl == reference else tree_rel_err(out, ref_out)
                ms = time_ms(fn, args, self.repeats)
            except Exception as e:  # one failing implementation must not end the run
                self.rows.append([name, impl, "error", "", f"{type(e).__name__}: {e}"[:120]])
                continue
            if impl == reference:
                ref_ms = ms
            speedup = f"{ref_ms / ms:.2f}x" if ref_ms else ""
            check = "ok" if err < self.tol else f"MISMATCH (> {self.tol:g})"
            self.rows.append([name, impl, f"{ms:.3f}", speedup, f"{err:.1e} {check}"])
            del out
        print(markdown_table(["case", "implementation", "ms", "vs XLA", "max rel err"],
                             self.rows[-len(impls):]), flush=True)


# ---------------------------------------------------------------------- sizes and inputs


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of the GPU cases (defaults: Llama-3.1-8B in bfloat16)."""

    hq: int = 32
    hkv: int = 8
    dh: int = 128
    page_size: int = PAGE_SIZE
    hidden: int = 4096
    intermediate: int = 14336
    lora_rank: int = LORA_RANK
    lora_slots: int = LORA_SLOTS
    decode: tuple[int, int] = (64, 2048)  # sequences, context
    prefill: tuple[int, int] = (4, 512)  # sequences, chunk length (from position 0)
    mixed: tuple[int, int, int, int] = (32, 1024, 240, 512)  # decode rows, their context,
    # two prefill chunks (one from 0, one continuing a prefix), one finetuning window
    flash_lengths: tuple[int, ...] = (2048, 8192)
    lora_tokens: tuple[int, int] = (256, 2048)  # decode-like mix, prefill-like runs
    lora_shapes: int = 2  # q_proj, then down_proj
    dtype: str = "bfloat16"
    interpret: bool = False  # --dry-run: kernels interpreted, XLA instead of cuDNN


FULL = Sizes()
QUICK = dataclasses.replace(FULL, decode=(32, 1024), flash_lengths=(2048,), lora_shapes=1)
DRY_RUN = Sizes(hq=8, hkv=2, dh=64, page_size=8, hidden=64, intermediate=128, lora_rank=8,
                decode=(4, 40), prefill=(2, 16), mixed=(3, 24, 5, 8), flash_lengths=(32,),
                lora_tokens=(12, 40), lora_shapes=1, dtype="float32", interpret=True)


def paged_inputs(rng: np.random.Generator, chunks: list[tuple[int, int]], num_tokens: int,
                 dtype, *, hq: int, hkv: int, dh: int,
                 page_size: int) -> tuple[jax.Array, ...]:
    """A TokenBatch-shaped ragged batch ((chunk length, first position) per sequence,
    padding tokens last) over a pool of random pages in the cache's combined K/V layout
    ``[P, page_size, 2 * Hkv, Dh]``: ``(q, kv_pages, page_tables, seq_ids, positions)``."""
    num_seqs = len(chunks)
    width = max(-(-(s + n) // page_size) for n, s in chunks)
    num_pages = num_seqs * width + 1
    tables = rng.permutation(num_pages)[: num_seqs * width].reshape(num_seqs, width)
    seq_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    cursor = 0
    for i, (n, start) in enumerate(chunks):
        seq_ids[cursor:cursor + n] = i
        positions[cursor:cursor + n] = np.arange(start, start + n)
        cursor += n
    assert cursor <= num_tokens

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    return (normal(num_tokens, hq, dh), normal(num_pages, page_size, 2 * hkv, dh),
            jnp.asarray(tables, jnp.int32), jnp.asarray(seq_ids), jnp.asarray(positions))


def dense_inputs(rng, b, length, dtype, *, hq, hkv, dh):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    return (normal(b, length, hq, dh), normal(b, length, hkv, dh), normal(b, length, hkv, dh),
            normal(b, length, hq, dh))


def lora_inputs(rng, slot_ids, in_dim, out_dim, dtype, *, rank, num_slots):
    t = len(slot_ids)

    def normal(*shape, s=1.0):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * s, dtype)

    return (normal(t, in_dim), normal(num_slots, in_dim, rank, s=0.05),
            normal(num_slots, rank, out_dim, s=0.05),
            jnp.asarray(rng.uniform(0.5, 2.0, num_slots), jnp.float32),
            jnp.asarray(np.asarray(slot_ids, np.int32)), normal(t, out_dim))


# -------------------------------------------------------------------------- GPU bench


def _dot_product_attention(sz: Sizes, q, k, v, **kw):
    """cuDNN's fused attention (plain XLA in a dry run, where there is no cuDNN)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=None if sz.interpret
                                        else "cudnn", **kw)


def _real_rows(spec, n):
    """Compare outputs on the first n tokens (the rest are padding, or absent)."""
    if isinstance(spec, str):
        return spec
    fn, args = spec
    return (jax.jit(lambda *a, fn=fn: fn(*a)[:n]), args)


def bench_paged_attention(bench: Bench, rng, sz: Sizes) -> None:
    missing = ""
    try:  # jax's own decode kernel is a comparison only: its absence ends nothing
        from jax.experimental.pallas.ops.gpu.paged_attention import (
            paged_attention as jax_paged,
        )
    except ImportError as e:
        jax_paged, missing = None, f"not importable in jax {jax.__version__}: {e}"

    dtype, hkv, dh = jnp.dtype(sz.dtype), sz.hkv, sz.dh
    (n_dec, ctx_dec), (n_pre, len_pre) = sz.decode, sz.prefill
    rows, ctx_mix, chunk, window = sz.mixed
    mixed = [(1, ctx_mix - 1)] * rows + [(chunk, 0), (chunk, ctx_mix - chunk), (window, 0)]
    cases = {
        f"decode {n_dec} seqs x ctx {ctx_dec}": ([(1, ctx_dec - 1)] * n_dec, n_dec),
        f"prefill {n_pre} x {len_pre} from 0": ([(len_pre, 0)] * n_pre, n_pre * len_pre),
        f"mixed: {rows} decode (ctx {ctx_mix}) + 2 chunks of {chunk} + {window}-token window":
            (mixed, rows + 2 * chunk + window),
    }
    for name, (chunks, num_tokens) in cases.items():
        args = paged_inputs(rng, chunks, num_tokens, dtype, hq=sz.hq, hkv=hkv, dh=dh,
                            page_size=sz.page_size)
        q, kv_pages, tables, seq_ids, positions = args
        k_pages, v_pages = split_kv(kv_pages)  # for the non-paged baselines only
        # The layout is computed once per step and shared by every layer: not timed.
        meta = jax.jit(ragged_attention_metadata, static_argnames=(
            "block_q", "pages_per_block"))(
            seq_ids, positions, tables,
            block_q=default_block_q(sz.hq // hkv, num_tokens, tables.shape[0]),
            pages_per_block=default_pages_per_block(sz.page_size))
        impls: dict = {
            "XLA reference": (jax.jit(ragged_paged_attention_reference), args),
            "ours (Pallas)": (jax.jit(lambda *a, m=meta: ragged_paged_attention(
                *a, metadata=m, interpret=sz.interpret)), args),
        }
        is_decode = all(n == 1 for n, _ in chunks)
        is_prefill = all(s == 0 for _, s in chunks) and len({n for n, _ in chunks}) == 1
        n = len(chunks)
        if is_decode:
            k_splits = next(s for s in (16, 8, 4, 2, 1) if tables.shape[1] % s == 0)
            lengths = positions[:n] + 1
            # jax's decode kernel wants [Hkv, P, page, Dh] pages: transposed outside timing.
            kt, vt = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
            impls["jax Pallas GPU paged_attention"] = missing if jax_paged is None else (
                jax.jit(lambda q, k, v, t, ln, ks=k_splits: jax_paged(
                    q, k, v, t, ln, k_splits=ks, interpret=sz.interpret)),
                # It applies no softmax scale: the queries come pre-scaled.
                ((q[:n] * (1.0 / np.sqrt(dh))).astype(q.dtype), kt, vt, tables, lengths))
            # cuDNN over K/V gathered densely outside the timing (so: not paged).
            kd = k_pages[tables].reshape(n, -1, hkv, dh)
            vd = v_pages[tables].reshape(n, -1, hkv, dh)
            impls["cuDNN dense (pre-gathered K/V)"] = (
                jax.jit(lambda q, k, v, ln: _dot_product_attention(
                    sz, q[:, None], k, v, key_value_seq_lengths=ln)[:, 0]),
                (q[:n], kd, vd, lengths))
        elif is_prefill:
            kd = k_pages[tables].reshape(n, -1, hkv, dh)[:, :len_pre]
            vd = v_pages[tables].reshape(n, -1, hkv, dh)[:, :len_pre]
            impls["cuDNN dense causal"] = (
                jax.jit(lambda q, k, v: _dot_product_attention(
                    sz, q.reshape(k.shape[0], k.shape[1], -1, k.shape[3]), k, v,
                    is_causal=True).reshape(q.shape)),
                (q, kd, vd))
        else:
            impls["cuDNN"] = "no dense form: ragged chunks over cached prefixes"
        if is_decode:  # jax's decode kernel and cuDNN return the real tokens only
            impls = {k: _real_rows(v, n) for k, v in impls.items()}
        bench.case(name, impls)


def _attention_fwd_bwd(attn: Callable) -> Callable:
    """jit of ``(q, k, v, w) -> (out, (dq, dk, dv))`` with cotangent ``w``."""

    def run(q, k, v, w):
        out, pullback = jax.vjp(attn, q, k, v)
        return out, pullback(w)

    return jax.jit(run)


def bench_flash(bench: Bench, rng, sz: Sizes) -> None:
    from coserve_jax.models.llama import blocked_causal_attention

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, 256)

    def flash(q, k, v):
        return flash_causal_attention(q, k, v, interpret=sz.interpret)

    def cudnn(q, k, v):
        return _dot_product_attention(sz, q, k, v, is_causal=True)

    for length in sz.flash_lengths:
        args = dense_inputs(rng, 1, length, jnp.dtype(sz.dtype), hq=sz.hq, hkv=sz.hkv,
                            dh=sz.dh)
        impls = {
            "XLA reference": (_attention_fwd_bwd(dense_causal_attention_reference), args),
            "XLA query-blocked (256)": (_attention_fwd_bwd(blocked), args),
            "ours (Pallas flash)": (_attention_fwd_bwd(flash), args),
            "cuDNN": (_attention_fwd_bwd(cudnn), args),
        }
        bench.case(f"causal fwd+bwd B=1 L={length}", impls)


def _lora_impls(scale, slots, groups, interpret: bool) -> dict[str, Callable]:
    """``(x, a, b) -> y`` of each implementation for one batch's slots."""
    return {
        "XLA reference": lambda x, a, b: lora_multi_slot_reference(x, a, b, scale, slots),
        "ours (grouped Pallas)": lambda x, a, b: lora_grouped(x, a, b, scale, groups,
                                                              interpret=interpret),
        "lax.ragged_dot": lambda x, a, b: lora_ragged_dot(x, a, b, scale, slots),
    }


def _lora_fwd_bwd(fn: Callable) -> Callable:
    """jit of ``(x, a, b, w) -> (y, (dx, da, db))`` with cotangent ``w``."""

    def run(x, a, b, w):
        out, pullback = jax.vjp(fn, x, a, b)
        return out, pullback(w)

    return jax.jit(run)


def bench_lora(bench: Bench, rng, sz: Sizes) -> None:
    n_dec, n_pre = sz.lora_tokens
    q = n_pre // 8
    mixes = {
        f"decode {n_dec} tok": rng.choice([-1, 0, 1, 2, 3], n_dec,
                                          p=[0.25, 0.3, 0.2, 0.15, 0.1]),
        f"prefill {n_pre} tok": np.repeat([0, -1, 1, 2], [3 * q, q, 2 * q, n_pre - 6 * q]),
    }
    shapes = {f"q_proj {sz.hidden}->{sz.hidden}": (sz.hidden, sz.hidden),
              f"down_proj {sz.intermediate}->{sz.hidden}": (sz.intermediate, sz.hidden)}
    shapes = dict(list(shapes.items())[: sz.lora_shapes])
    for mix, slot_ids in mixes.items():
        for shape_name, (din, dout) in shapes.items():
            x, a, b, scale, slots, w = lora_inputs(rng, slot_ids, din, dout,
                                                   jnp.dtype(sz.dtype), rank=sz.lora_rank,
                                                   num_slots=sz.lora_slots)
            # Grouped once, as a step does for all its layers and projections: not timed.
            groups = jax.jit(group_tokens, static_argnums=(1, 2))(slots, sz.lora_slots, 16)
            impls = _lora_impls(scale, slots, groups, sz.interpret)
            bench.case(f"LoRA fwd {mix} {shape_name}",
                       {k: (jax.jit(fn), (x, a, b)) for k, fn in impls.items()})
            bench.case(f"LoRA fwd+bwd {mix} {shape_name}",
                       {k: (_lora_fwd_bwd(fn), (x, a, b, w)) for k, fn in impls.items()})


def run_gpu(sz: Sizes, repeats: int, tol: float) -> str:
    rng = np.random.default_rng(0)
    bench = Bench(repeats, tol=tol)
    for part in (bench_paged_attention, bench_flash, bench_lora):
        part(bench, rng, sz)
    return markdown_table(["case", "implementation", "ms", "vs XLA", "max rel err"],
                          bench.rows)


# --------------------------------------------------------------------------- CPU check


def run_cpu_check() -> str:
    """Tiny shapes, float32, Pallas interpret mode: correctness only."""
    rng = np.random.default_rng(0)
    rows = []

    def check(name, out, ref, tol=1e-5):
        err = tree_rel_err(out, ref)
        rows.append([name, f"{err:.1e}", "ok" if err < tol else "MISMATCH"])

    args = paged_inputs(rng, [(1, 9), (7, 3), (1, 30), (16, 0)], 28, jnp.float32,
                        hq=8, hkv=2, dh=64, page_size=8)
    check("ragged paged attention (GQA 4, decode + chunks + window)",
          jax.jit(lambda *a: ragged_paged_attention(*a, block_q=4, interpret=True))(*args),
          ragged_paged_attention_reference(*args))

    q, k, v, w = dense_inputs(rng, 1, 24, jnp.float32, hq=4, hkv=1, dh=64)

    def fwd_bwd(attn):
        out, pullback = jax.vjp(attn, q, k, v)
        return out, pullback(w)

    check("flash causal attention fwd + dq, dk, dv",
          jax.jit(lambda: fwd_bwd(lambda *a: flash_causal_attention(
              *a, block_q=4, block_k=8, interpret=True)))(),
          fwd_bwd(dense_causal_attention_reference))

    slot_ids = [0, -1, 2, 2, 1, -1, 0, 0, 3, 1]
    x, a, b, scale, slots, w = lora_inputs(rng, slot_ids, 32, 48, jnp.float32, rank=8,
                                           num_slots=LORA_SLOTS)
    groups = group_tokens(slots, LORA_SLOTS, 16)

    def lora_fwd_bwd(fn):
        out, pullback = jax.vjp(fn, x, a, b)
        return out, pullback(w)

    check("grouped multi-LoRA fwd + dx, dA, dB",
          jax.jit(lambda: lora_fwd_bwd(
              lambda x, a, b: lora_grouped(x, a, b, scale, groups, interpret=True)))(),
          lora_fwd_bwd(lambda x, a, b: lora_multi_slot_reference(x, a, b, scale, slots)))
    check("lax.ragged_dot multi-LoRA fwd",
          lora_ragged_dot(x, a, b, scale, slots),
          lora_multi_slot_reference(x, a, b, scale, slots))
    return markdown_table(["check (float32, interpret mode)", "max rel err", "result"], rows)


# ------------------------------------------------------------------------------- main


def record_run(body: str, args) -> None:
    device = jax.devices()[0]
    record("kernels: Pallas kernels vs XLA and jax kernels", {
        "device": f"{device.device_kind} ({jax.default_backend()})",
        "versions": f"jax {jax.__version__}, python {sys.version.split()[0]}",
        "shapes": "Llama-3.1-8B (32/8 heads, head_dim 128, hidden 4096, intermediate 14336), "
                  f"bfloat16, page size {PAGE_SIZE}; LoRA rank {LORA_RANK} x {LORA_SLOTS} slots",
        "timing": f"median of {args.repeats} runs after warm-up; errors vs the XLA reference",
    }, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tol", type=float, default=2e-2,
                   help="max relative error accepted in bfloat16 (GPU)")
    p.add_argument("--quick", action="store_true", help="fewer and smaller GPU cases")
    p.add_argument("--dry-run", action="store_true",
                   help="run the GPU cases' code on CPU at tiny sizes (kernels interpreted, "
                        "XLA for cuDNN); checks the script, times nothing meaningful")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    backend = jax.default_backend()
    if args.dry_run:
        table = run_gpu(DRY_RUN, repeats=1, tol=1e-5)
        print("\nall cases (dry run):\n" + table)
        return 0 if "MISMATCH" not in table and "| error |" not in table else 1
    if backend not in ("gpu", "cuda", "rocm"):
        print(f"no GPU available (jax backend: {backend}): nothing is timed; running a tiny "
              "correctness check of every kernel in Pallas interpret mode instead.")
        table = run_cpu_check()
        print(table)
        return 0 if "MISMATCH" not in table else 1
    table = run_gpu(QUICK if args.quick else FULL, args.repeats, args.tol)
    print("\nall cases:\n" + table)
    if not args.no_record:
        record_run(table, args)
    return 0 if "MISMATCH" not in table else 1


if __name__ == "__main__":
    sys.exit(main())
