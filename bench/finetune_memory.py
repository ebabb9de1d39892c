"""Activation memory of finetuning one sequence: plain ``jax.grad`` vs. the pruned path.

Everything here is XLA's compiled memory analysis
(``jax.jit(f).lower(*abstract).compile().memory_analysis()``) of programs whose
inputs are ``jax.ShapeDtypeStruct`` pytrees, so no weight or activation is ever
allocated and the figures are deterministic. Shapes are Llama-3.1-8B in
bfloat16 with LoRA r=16 on all seven projections.

- **plain**: ``jax.grad`` of the weighted cross-entropy of the whole sequence
  (``forward_dense`` with ``single_adapter_lora``, the loss of
  ``tests/test_finetune_grads.py::whole_sequence_grads``) w.r.t. the LoRA
  weights. Its temp bytes hold everything the backward saves.
- **ours**: the co-serving step's finetuning forward window (``step_fn`` with
  ``with_train=True``: ``--windows`` tokens of the sequence, one sequence, a page
  table as wide as the sequence, so the last, widest window) and a one-layer backward piece
  (``backward_piece_fn``, ``seq_len`` = the sequence length). The KV cache and
  ``TrainBuffers`` are donated arguments, not temps; the state the pruned path
  keeps between programs is counted separately: saved layer inputs
  ``L * n * D`` bf16 plus the boundary gradient ``n * D`` float32.

    python bench/finetune_memory.py                 # 1024, 4096, 8192 x windows 64, 256, 512
    python bench/finetune_memory.py --lengths 1024 --windows 256 --no-record

Compiling needs no accelerator (about 10 s and 0.5 GB of host RAM per length on
CPU); figures are those of the backend jax runs on, which is recorded. XLA:CPU
cannot multiply bfloat16: it upcasts bf16 dots to f32 and hoists f32 copies of
the stacked weights out of the layer loop, which would swamp every figure. So on
CPU (``--dtype auto``) the programs are compiled in float16, which has the same
two-byte width and which XLA:CPU's dot emitter takes natively once the pass that
upcasts it is disabled (``--xla_disable_hlo_passes=change-op-data-type``); a
check refuses to go on if a float16 matmul still gets f32 temporaries.
``--dtype bfloat16`` shows the raw figures (on a GPU, auto picks bfloat16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from coserve_jax.batch import TokenBatch
from coserve_jax.config import ModelConfig
from coserve_jax.finetune.buffers import TrainBuffers
from coserve_jax.kv_cache import KVCache
from coserve_jax.lora.adapter import module_shape
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.lora.slots import AdapterSlots
from coserve_jax.model import single_adapter_lora
from coserve_jax.models import llama
from coserve_jax.step import BackwardPiece, backward_piece_fn, step_fn

from benchlib import library_revision, record

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9

# Llama-3.1-8B's config.json, as far as the model reads it.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def sds(shape: tuple[int, ...], dtype: DTypeLike) -> jax.ShapeDtypeStruct:
    """An abstract array: shape and dtype, no storage."""
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


# ----- abstract inputs -------------------------------------------------------------------------


def abstract_params(cfg: ModelConfig, dtype: DTypeLike) -> llama.Params:
    """Frozen base weights as ``ShapeDtypeStruct`` leaves (untied LM head, no biases)."""
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    layers = llama.LayerParams(
        input_norm=sds((n, d), dtype), q_proj=sds((n, d, cfg.q_size), dtype),
        k_proj=sds((n, d, cfg.kv_size), dtype), v_proj=sds((n, d, cfg.kv_size), dtype),
        o_proj=sds((n, cfg.q_size, d), dtype), post_norm=sds((n, d), dtype),
        gate_proj=sds((n, d, f), dtype), up_proj=sds((n, d, f), dtype),
        down_proj=sds((n, f, d), dtype))
    return llama.Params(embed=sds((cfg.vocab_size, d), dtype), layers=layers,
                        final_norm=sds((d,), dtype), lm_head=sds((d, cfg.vocab_size), dtype))


def abstract_adapter(cfg: ModelConfig, rank: int, dtype: DTypeLike) -> dict[str, tuple]:
    """One adapter ``{module: (A [L, in, r], B [L, r, out])}`` on all seven projections."""
    out = {}
    for m in ALL_TARGETS:
        fan_in, fan_out = module_shape(cfg, m)
        out[m] = (sds((cfg.num_layers, fan_in, rank), dtype),
                  sds((cfg.num_layers, rank, fan_out), dtype))
    return out


def abstract_slots(cfg: ModelConfig, num_slots: int, rank: int, dtype: DTypeLike) -> AdapterSlots:
    """The adapter slot table (``AdapterSlots``: a/b ``[L, N, in|R, R|out]``, scale ``[N]``)."""
    a, b = {}, {}
    for m in ALL_TARGETS:
        fan_in, fan_out = module_shape(cfg, m)
        a[m] = sds((cfg.num_layers, num_slots, fan_in, rank), dtype)
        b[m] = sds((cfg.num_layers, num_slots, rank, fan_out), dtype)
    return AdapterSlots(a=a, b=b, scale=sds((num_slots,), jnp.float32))


def abstract_train(cfg: ModelConfig, slots: AdapterSlots, rows: int,
                   dtype: DTypeLike) -> TrainBuffers:
    """``TrainBuffers`` of one sequence of ``rows`` tokens."""
    return TrainBuffers(
        acts=sds((cfg.num_layers, rows, cfg.hidden_size), dtype),
        grads_h=sds((rows, cfg.hidden_size), jnp.float32),
        grad_a={m: sds(a.shape, jnp.float32) for m, a in slots.a.items()},
        grad_b={m: sds(b.shape, jnp.float32) for m, b in slots.b.items()})


def abstract_kv(cfg: ModelConfig, num_pages: int, page_size: int, dtype: DTypeLike) -> KVCache:
    """A ``KVCache`` of ``num_pages`` pages for every layer."""
    shape = (cfg.num_layers, num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    return KVCache(pages=sds(shape, dtype))


def abstract_batch(num_tokens: int, num_seqs: int, num_pages: int) -> TokenBatch:
    """A ``TokenBatch`` bucket of ``T`` tokens, ``S`` sequences and ``W`` page-table columns."""
    t, s = (num_tokens,), (num_seqs,)
    i32, f32 = jnp.int32, jnp.float32
    return TokenBatch(
        token_ids=sds(t, i32), positions=sds(t, i32), seq_ids=sds(t, i32), slots=sds(t, i32),
        token_mask=sds(t, jnp.bool_), page_tables=sds((num_seqs, num_pages), i32),
        logits_indices=sds(s, i32), temperature=sds(s, f32), top_k=sds(s, i32),
        top_p=sds(s, f32), seeds=sds(s, i32), sample_counts=sds(s, i32),
        adapter_slots=sds(t, i32), labels=sds(t, i32), loss_weights=sds(t, f32),
        act_index=sds(t, i32), feed_rows=sds(t, i32))


def abstract_piece() -> BackwardPiece:
    """A ``BackwardPiece``: four int32 scalars."""
    scalar = sds((), jnp.int32)
    return BackwardPiece(act_row=scalar, layer_start=scalar, length=scalar, adapter_slot=scalar)


# ----- the programs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Memory analysis of one compiled program (bytes) and its compile time (s)."""

    temp: int
    argument: int
    output: int
    alias: int
    seconds: float


def analyse(fn: Callable, *args, donate: tuple[int, ...] = ()) -> Compiled:
    """Lowers and compiles ``fn`` on abstract ``args``; returns XLA's memory analysis."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return Compiled(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes,
                    output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                    seconds=seconds)


def plain_grad(cfg: ModelConfig, seq_len: int, rank: int, dtype: DTypeLike) -> Compiled:
    """``jax.grad`` of the whole-sequence loss w.r.t. one adapter's A and B (float32)."""
    def loss_grad(params: llama.Params, weights: dict, tokens: jax.Array, labels: jax.Array,
                  loss_weights: jax.Array, scale: jax.Array) -> dict:
        lora = single_adapter_lora(scale)

        def loss(w: dict) -> jax.Array:
            logits = llama.forward_dense(cfg, params, tokens, w, lora)[0]
            ce = (jax.nn.logsumexp(logits, -1)
                  - logits[jnp.arange(labels.shape[0]), labels])
            return jnp.sum(ce * loss_weights)

        return jax.grad(loss)(weights)

    return analyse(loss_grad, abstract_params(cfg, dtype),
                   abstract_adapter(cfg, rank, jnp.float32), sds((1, seq_len), jnp.int32),
                   sds((seq_len,), jnp.int32), sds((seq_len,), jnp.float32),
                   sds((), jnp.float32))


def step_window(cfg: ModelConfig, seq_len: int, window: int, rank: int, num_slots: int,
                page_size: int, dtype: DTypeLike) -> Compiled:
    """The co-serving step with ``window`` finetuning tokens of one ``seq_len`` sequence."""
    pages = -(-seq_len // page_size)
    slots = abstract_slots(cfg, num_slots, rank, dtype)
    fn = functools.partial(step_fn, cfg, with_train=True, return_logits=False)
    return analyse(fn, abstract_params(cfg, dtype), slots,
                   abstract_kv(cfg, pages, page_size, dtype),
                   abstract_train(cfg, slots, seq_len, dtype), abstract_batch(window, 1, pages),
                   donate=(2, 3))


def backward_piece(cfg: ModelConfig, seq_len: int, rank: int, num_slots: int,
                   dtype: DTypeLike) -> Compiled:
    """One backward piece (one layer) over the whole ``seq_len`` sequence."""
    slots = abstract_slots(cfg, num_slots, rank, dtype)
    fn = functools.partial(backward_piece_fn, cfg, num_layers=1, seq_len=seq_len)
    return analyse(fn, abstract_params(cfg, dtype), slots,
                   abstract_train(cfg, slots, seq_len, dtype), abstract_piece(), donate=(2,))


# ----- one sequence length ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """The figures of one sequence length and window size (bytes)."""

    seq_len: int
    window_tokens: int
    plain: Compiled
    window: Compiled
    piece: Compiled
    saved_acts: int  # L * n * D in the model dtype
    grads_h: int  # n * D float32
    kv_pages: int  # the sequence's K/V pages, held during its forward windows only

    @property
    def saved(self) -> int:
        """What the pruned path keeps between programs."""
        return self.saved_acts + self.grads_h

    @property
    def ours(self) -> int:
        """Peak finetuning memory of the pruned path beyond the weights and the LoRA state:
        the saved state plus the larger of the forward phase (window temps and the
        sequence's KV pages) and the backward phase (piece temps)."""
        return self.saved + max(self.window.temp + self.kv_pages, self.piece.temp)

    @property
    def ratio(self) -> float:
        """Plain grad temp over our peak."""
        return self.plain.temp / self.ours


def measure(cfg: ModelConfig, seq_len: int, windows: list[int], rank: int, num_slots: int,
            page_size: int, dtype: DTypeLike) -> list[Row]:
    """Compiles plain grad, the backward piece and a step per window for one length."""
    itemsize = jnp.dtype(dtype).itemsize
    d = cfg.hidden_size
    pages = -(-seq_len // page_size)
    kv = 2 * cfg.num_layers * pages * page_size * cfg.num_kv_heads * cfg.head_dim * itemsize
    plain = plain_grad(cfg, seq_len, rank, dtype)
    print(f"  n={seq_len}: plain grad compiled in {plain.seconds:.0f}s", flush=True)
    piece = backward_piece(cfg, seq_len, rank, num_slots, dtype)
    print(f"  n={seq_len}: backward piece compiled in {piece.seconds:.0f}s", flush=True)
    rows = []
    for w in sorted({min(w, seq_len) for w in windows}):
        win = step_window(cfg, seq_len, w, rank, num_slots, page_size, dtype)
        print(f"  n={seq_len}: step with a {w}-token window compiled in {win.seconds:.0f}s",
              flush=True)
        rows.append(Row(seq_len=seq_len, window_tokens=w, plain=plain, window=win, piece=piece,
                        saved_acts=cfg.num_layers * seq_len * d * itemsize,
                        grads_h=seq_len * d * 4, kv_pages=kv))
    return rows


# ----- the backend -----------------------------------------------------------------------------

# XLA:CPU has no bfloat16 dot: a float-normalization pass turns every bf16 dot into an f32
# one and loop-invariant code motion then hoists f32 copies of the *stacked* weights out
# of the layer scan (gigabytes per projection for 8B), and change-op-data-type upcasts
# float16 dots too (f32 copies of one layer's weights, of the LM head). Its dot emitter
# does take float16 operands, so on CPU the analysis runs float16 (same two bytes as
# bfloat16) with that pass disabled: the dots keep two-byte operands and outputs, as
# cuBLAS bf16 GEMMs do on a GPU.
CPU_NO_UPCAST_FLAG = "--xla_disable_hlo_passes=change-op-data-type"


def accelerator_expected() -> bool:
    """Whether jax will pick an accelerator (an accelerator plugin is installed and
    ``JAX_PLATFORMS`` does not force the CPU); decided without starting a backend."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    names = {(d.metadata["Name"] or "").lower().replace("_", "-")
             for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def choose_dtype(name: str) -> tuple[jnp.dtype, str]:
    """The dtype to compile with and a note saying why (``auto``: bf16 unless on XLA:CPU).

    Must run before anything starts a jax backend: XLA reads ``XLA_FLAGS`` then.
    """
    if name == "auto":
        name = "bfloat16" if accelerator_expected() else "float16"
    if name == "float16":
        flags = os.environ.get("XLA_FLAGS", "")
        if CPU_NO_UPCAST_FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_NO_UPCAST_FLAG}".strip()
        check_two_byte_dots()
        return jnp.dtype(jnp.float16), (
            "float16 as a stand-in for bfloat16 (same 2-byte width; XLA:CPU, with "
            f"`{CPU_NO_UPCAST_FLAG}` so dots keep 2-byte operands instead of being upcast "
            "to f32)")
    note = "bfloat16"
    if jax.default_backend() == "cpu":
        note += (" on XLA:CPU, which upcasts bf16 dots to f32 and hoists f32 copies of the "
                 "stacked weights out of the layer loop: temps inflated by that artifact")
    return jnp.dtype(jnp.bfloat16), note


def check_two_byte_dots() -> None:
    """Fails unless a float16 matmul compiles without f32 temporaries."""
    a = sds((1024, 1024), jnp.float16)
    temp = jax.jit(jnp.matmul).lower(a, a).compile().memory_analysis().temp_size_in_bytes
    if temp:
        raise RuntimeError(f"a float16 matmul still has {temp} bytes of temporaries: the "
                           "backend upcasts dots, so the figures would not be those of bf16")


# ----- report ----------------------------------------------------------------------------------


def machine_info(dtype_note: str) -> dict[str, str]:
    """CPU model, cores, RAM, jax backend and versions, library revision."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    device = jax.devices()[0]
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores{mem}",
        "jax backend": f"{jax.default_backend()} ({device.device_kind})",
        "versions": f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
                    f"python {platform.python_version()}",
        "coserve_jax": library_revision(),
        "dtype": dtype_note,
    }




def gb(n: float) -> str:
    """Bytes as GB (1e9) with two decimals."""
    return f"{n / GB:,.2f}"


def table(rows: list[Row]) -> str:
    """Markdown table of the rows (GB = 1e9 bytes)."""
    header = ["seq len", "window", "plain grad temp", "ours: window temp", "ours: piece temp",
              "ours: saved acts + grads_h", "ours: seq KV pages (fwd only)", "ours: total",
              "plain / ours"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        cells = [str(r.seq_len), str(r.window_tokens), gb(r.plain.temp), gb(r.window.temp),
                 gb(r.piece.temp),
                 f"{gb(r.saved_acts)} + {gb(r.grads_h)}", gb(r.kv_pages), gb(r.ours),
                 f"{r.ratio:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments, compiles every program, prints the table and records it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192],
                        help="sequence lengths (tokens)")
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 512],
                        help="finetuning tokens of the sequence in one step (one row each)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--slots", type=int, default=4, help="adapter slots of the step")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--layers", type=int,
                        help="compile fewer layers (figures are then for that many layers)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16, or the float16 stand-in on XLA:CPU")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    cfg = ModelConfig.from_hf_dict(LLAMA31_8B)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    dtype, dtype_note = choose_dtype(args.dtype)
    info = machine_info(dtype_note)
    for key, value in info.items():
        print(f"{key}: {value}")
    rows = [row for n in args.lengths
            for row in measure(cfg, n, args.windows, args.rank, args.slots, args.page_size,
                               dtype)]

    layers = "" if cfg.num_layers == 32 else f" ({cfg.num_layers} LAYERS ONLY)"
    label = (f"Llama-3.1-8B shapes{layers}, LoRA r={args.rank} on all 7 projections, one "
             "sequence, 1-layer backward pieces")
    body = table(rows) + "\n\n" + notes(cfg, rows)
    print(f"\n{label}\n\n{body}")
    if not args.no_record:
        record(f"finetune_memory: {label}", info, body)


def notes(cfg: ModelConfig, rows: list[Row]) -> str:
    """What the columns mean, and the attention terms behind them (from the shapes)."""
    n = max(r.seq_len for r in rows)
    t = max(r.window_tokens for r in rows if r.seq_len == n)
    h, layers = cfg.num_heads, cfg.num_layers
    scores = h * n * n * 4  # one [H, n, n] float32 attention matrix
    window_scores = t * h * n * 4  # the reference paged attention's scores for one sequence
    return (
        "GB = 1e9 bytes, from XLA's compiled memory analysis on abstract inputs (nothing "
        "allocated). *plain grad temp*: `temp_size_in_bytes` of `jax.grad` of the "
        "whole-sequence loss w.r.t. the LoRA weights (everything it saves for the backward). "
        "*window temp*: the co-serving step with *window* finetuning tokens and a page table as "
        "wide as the sequence (its KV cache and train buffers are donated arguments, not "
        "temps). *piece temp*: one one-layer backward piece over the whole sequence. *saved "
        "acts + grads_h*: what the pruned path keeps between programs (every layer's input in "
        "the model dtype, the boundary gradient in f32). *seq KV pages*: the sequence's K/V, "
        "held only while its forward windows run. *ours: total* = saved + max(window temp + "
        "seq KV pages, piece temp). Neither side counts the frozen weights or the LoRA "
        "weights, gradients and accumulators.\n\n"
        "Attention terms: plain grad keeps the float32 attention matrices [H, n, n] of every "
        f"layer for its backward ({layers} layers x [{h}, {n}, {n}] f32 = "
        f"{gb(layers * scores)} GB per saved copy at n={n}). The step's reference paged "
        "attention gathers each sequence's pages once and holds float32 scores [T, H, S, C] "
        f"({gb(window_scores)} GB at T={t}, S=1, C={n}). The backward piece computes "
        "attention 256 queries at a time under rematerialisation, so it holds [H, 256, n] "
        "scores rather than [H, n, n]; at long sequences the piece still sets our peak.")


if __name__ == "__main__":
    main()
