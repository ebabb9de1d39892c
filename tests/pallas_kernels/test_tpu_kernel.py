"""jax's TPU ragged paged attention kernel on our combined KV cache, checked on CPU.

Three parts (``pallas_kernels/ragged_paged_attention/tpu.py`` has the background):

- the kernel itself in Pallas' TPU interpret mode against our reference (float32,
  within 1e-5, unwritten outputs poisoned with NaN by the interpreter). A jax whose
  TPU interpreter cannot run the kernel (0.10.2: it cannot read through the kernel's
  reshaped VMEM ref) xfails with the interpreter's error; any other error fails;
- the adapter's inputs against jax's own jnp reference of the kernel and its runtime
  input validation, with the kernel replaced by a recorder that checks it was handed
  the cache array itself and poisons the rows the adapter must drop;
- the traced program: the kernel's cache operand is the cache, or (``layer=``) a
  reshape of the stacked cache; no gather, slice or copy of it, at Llama-3.1-8B shapes.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import MIXES, assert_close, paged_batch

from pallas_kernels import Kernels
from pallas_kernels.ragged_paged_attention import combine_kv, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu import (
    real_token_mask,
    tpu_kernel_supports,
    tpu_ragged_paged_attention,
)

tpu_rpa = pytest.importorskip("jax.experimental.pallas.ops.tpu.ragged_paged_attention")

# What jax 0.10.2's TPU interpreter raises on the kernel's `kv_ref.reshape(...)` reads.
INTERPRETER_CANNOT_RESHAPE = "'ReshapeTransform' object has no attribute 'indices'"

# (mix, query heads per kv head, kv heads, page_size, queries per block, kv pages per
# block). The kernel needs head_dim a multiple of 128 and 2 * Hkv in (2, 4, 8) or a
# multiple of 8 (float32).
INTERPRET_CASES = [
    ("mixed", 2, 2, 8, 8, 2),
    ("decode", 4, 1, 16, 4, 1),
    ("prefill", 1, 4, 4, 16, 4),
]
SLOW_INTERPRET_CASES = [(mix, g, hkv, ps, 8, 2) for mix in sorted(MIXES)
                        for g in (1, 2, 4) for hkv in (1, 2) for ps in (4, 8, 16)]


def _interpret_case(case):
    mix, g, hkv, page_size, bq, bkv = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    batch = paged_batch(rng, mix, num_q_per_kv=g, num_kv_heads=hkv, head_dim=128,
                        page_size=page_size)
    try:
        out = np.asarray(tpu_ragged_paged_attention(
            *batch.args, interpret=True, num_queries_per_block=bq,
            num_kv_pages_per_block=bkv))
    except Exception as err:  # the interpreter's error reaches us through a callback
        if INTERPRETER_CANNOT_RESHAPE in str(err):
            pytest.xfail(f"jax {jax.__version__}'s TPU interpreter cannot run the kernel: "
                         f"AttributeError: {INTERPRETER_CANNOT_RESHAPE}")
        raise
    real = np.asarray(real_token_mask(batch.seq_ids, batch.positions))
    ref = np.asarray(ragged_paged_attention_reference(*batch.args))
    assert_close(out[real], ref[real], what="TPU kernel (interpret mode)")
    assert not out[~real].any()  # padding tokens come back as zeros


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
def test_tpu_kernel_in_interpret_mode_matches_reference(case):
    _interpret_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_INTERPRET_CASES, ids=str)
def test_tpu_kernel_in_interpret_mode_sweep(case):
    _interpret_case(case)


class _RecordingKernel:
    """Stands in for jax's kernel: runs jax's validation and jnp reference of it on the
    inputs it is handed, keeps them, and returns ``[T]`` rows with NaN past the real
    tokens (the kernel leaves those rows undefined; the adapter must drop them)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                 sm_scale, **tuning):
        self.calls.append((q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs))
        inputs = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
        tpu_rpa.dynamic_validate_inputs(*inputs, sm_scale=sm_scale, **tuning)
        real = tpu_rpa.ref_ragged_paged_attention(*inputs, sm_scale=sm_scale)
        poison = jnp.full((q.shape[0] - real.shape[0], *q.shape[1:]), jnp.nan, q.dtype)
        return jnp.concatenate([real, poison])


# (mix, query heads per kv head, kv heads, page size): every mix, GQA 1/2/4, pages
# 4/8/16 in the default suite (jax's reference runs eagerly, one sequence at a time, so
# each case costs seconds); every combination in the slow sweep.
ADAPTER_CASES = [("decode", 1, 2, 4), ("mixed", 2, 2, 8), ("prefill", 4, 1, 16)]
SLOW_ADAPTER_CASES = [(mix, g, hkv, ps) for mix in sorted(MIXES) for g in (1, 2, 4)
                      for hkv in (1, 2) for ps in (4, 8, 16)
                      if (mix, g, hkv, ps) not in ADAPTER_CASES]


@pytest.mark.parametrize("case", [
    *ADAPTER_CASES, *(pytest.param(c, marks=pytest.mark.slow) for c in SLOW_ADAPTER_CASES)],
    ids=str)
def test_adapter_hands_the_kernel_the_cache_itself(case, monkeypatch):
    mix, g, hkv, page_size = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    batch = paged_batch(rng, mix, num_q_per_kv=g, num_kv_heads=hkv, head_dim=32,
                        page_size=page_size)
    kernel = _RecordingKernel()
    monkeypatch.setattr(tpu_rpa, "ragged_paged_attention", kernel)
    out = tpu_ragged_paged_attention(*batch.args)
    (call,) = kernel.calls
    assert call[1] is batch.kv_pages  # the cache object itself: nothing was copied
    real = np.asarray(real_token_mask(batch.seq_ids, batch.positions))
    n = sum(c for c, _ in MIXES[mix])
    assert real.tolist() == [True] * n + [False] * (real.size - n)
    ref = np.asarray(ragged_paged_attention_reference(*batch.args))
    out = np.asarray(out)
    assert_close(out[real], ref[real], what="adapter (jax's jnp reference of the kernel)")
    assert not out[~real].any()  # the poisoned rows were dropped


def test_adapter_with_layer_index_reads_that_layer(monkeypatch):
    """``layer=``: the stacked cache viewed as ``[L * P, ...]``, page ids offset."""
    rng = np.random.default_rng(21)
    batch = paged_batch(rng, "mixed", num_q_per_kv=2, num_kv_heads=2, head_dim=32,
                        page_size=8)
    other = jnp.asarray(rng.standard_normal(batch.kv_pages.shape, np.float32))
    stacked = jnp.stack([other, batch.kv_pages, -other])
    kernel = _RecordingKernel()
    monkeypatch.setattr(tpu_rpa, "ragged_paged_attention", kernel)
    out = tpu_ragged_paged_attention(batch.q, stacked, *batch.args[2:], layer=jnp.int32(1))
    (call,) = kernel.calls
    assert call[1].shape == (3 * batch.kv_pages.shape[0], *batch.kv_pages.shape[1:])
    real = np.asarray(real_token_mask(batch.seq_ids, batch.positions))
    ref = np.asarray(ragged_paged_attention_reference(*batch.args))
    assert_close(np.asarray(out)[real], ref[real])


def _consumers_of_cache(jaxpr, var) -> list[str]:
    """Names of the primitives that read ``var`` (following it through reshapes and into
    nested jaxprs): the route from the step's cache to the kernel."""
    seen = []
    for eqn in jaxpr.eqns:
        if not any(v is var for v in eqn.invars):
            continue
        seen.append(eqn.primitive.name)
        if eqn.primitive.name == "reshape":
            seen += _consumers_of_cache(jaxpr, eqn.outvars[0])
        inner = eqn.params.get("jaxpr")
        if inner is not None and eqn.primitive.name != "pallas_call":
            inner = getattr(inner, "jaxpr", inner)
            for outer, inner_var in zip(eqn.invars, inner.invars, strict=True):
                if outer is var:
                    seen += _consumers_of_cache(inner, inner_var)
    return seen


@pytest.mark.parametrize("layer", [None, 1])
def test_traced_step_hands_the_cache_to_the_kernel(layer):
    """What the step runs on a TPU (``Kernels(impl="tpu")``), traced at Llama-3.1-8B
    attention shapes in bfloat16: the real kernel's ``pallas_call`` reads the cache
    directly (with ``layer``, through a reshape that merges the leading axes)."""
    S = jax.ShapeDtypeStruct
    t, hq, hkv, dh, pages, page_size, seqs, width = 64, 32, 8, 128, 64, 16, 8, 12
    cache_shape = (pages, page_size, 2 * hkv, dh)
    if layer is not None:
        cache_shape = (2, *cache_shape)
    args = (S((t, hq, dh), jnp.bfloat16), S(cache_shape, jnp.bfloat16),
            S((seqs, width), jnp.int32), S((t,), jnp.int32), S((t,), jnp.int32))

    def step(q, kv, tables, seq_ids, positions):
        # The tuned block table needs a TPU to say its version; these are its v4 sizes.
        return tpu_ragged_paged_attention(
            q, kv, tables, seq_ids, positions,
            layer=None if layer is None else jnp.int32(layer),
            num_kv_pages_per_block=4, num_queries_per_block=32)

    closed = jax.make_jaxpr(step)(*args)
    route = _consumers_of_cache(closed.jaxpr, closed.jaxpr.invars[1])
    expected = {"pallas_call", "pjit", "jit", "closed_call"} | (
        {"reshape"} if layer is not None else set())
    assert "pallas_call" in route and set(route) <= expected, route
    assert route.count("reshape") == (0 if layer is None else 1), route


def test_dispatch_routes_tpu_attention_to_the_adapter(monkeypatch):
    """``Kernels(impl="tpu")``, what a TPU step is built with, hands the kernel the cache."""
    rng = np.random.default_rng(23)
    batch = paged_batch(rng, "mixed", num_q_per_kv=4, num_kv_heads=1, head_dim=128,
                        page_size=8)
    kernel = _RecordingKernel()
    monkeypatch.setattr(tpu_rpa, "ragged_paged_attention", kernel)
    attention = Kernels(impl="tpu").plan_paged_attention(
        batch.seq_ids, batch.positions, batch.page_tables, num_q_per_kv=4, page_size=8)
    out = attention(*batch.args)
    (call,) = kernel.calls
    assert call[1] is batch.kv_pages
    real = np.asarray(real_token_mask(batch.seq_ids, batch.positions))
    assert_close(np.asarray(out)[real],
                 np.asarray(ragged_paged_attention_reference(*batch.args))[real])


def test_shapes_the_kernel_cannot_take_fall_back_to_the_reference(monkeypatch, caplog):
    """head_dim 64 (Llama-3.2-1B) is not a multiple of the kernel's 128 lanes: the TPU
    path runs the jnp attention instead, with a warning, rather than failing to trace."""
    assert tpu_kernel_supports(128, 32, 8, jnp.bfloat16, jnp.bfloat16)  # Llama-3.1-8B
    assert tpu_kernel_supports(128, 28, 4, jnp.bfloat16, jnp.bfloat16)  # Qwen2.5-7B
    assert not tpu_kernel_supports(64, 32, 8, jnp.bfloat16, jnp.bfloat16)
    assert not tpu_kernel_supports(128, 12, 3, jnp.float32, jnp.float32)  # 6 combined heads
    batch = paged_batch(np.random.default_rng(24), "decode", num_q_per_kv=2,
                        num_kv_heads=2, head_dim=64, page_size=8)
    kernel = _RecordingKernel()
    monkeypatch.setattr(tpu_rpa, "ragged_paged_attention", kernel)
    with caplog.at_level("WARNING"):
        out = Kernels(impl="tpu").paged_attention(*batch.args)
    assert not kernel.calls and "falling back" in caplog.text
    assert_close(out, ragged_paged_attention_reference(*batch.args))


def test_combine_kv_interleaves_heads():
    """K of head h at 2h, V at 2h + 1: the layout jax's kernel documents and its
    reference reads (``kv_pages[..., 0::2, :]`` / ``1::2``)."""
    k = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    v = -k
    kv = np.asarray(combine_kv(k, v))
    assert kv.shape == (2, 6, 4)
    np.testing.assert_array_equal(kv[:, 0::2], k)
    np.testing.assert_array_equal(kv[:, 1::2], v)
