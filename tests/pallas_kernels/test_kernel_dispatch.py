"""Which implementation the step gets, and that the kernel path equals the reference one."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import assert_close, lora_inputs, paged_batch

from pallas_kernels import KernelOptions, select_kernels
from pallas_kernels.dispatch import ENV_VAR, Kernels, resolve_impl
from pallas_kernels.lora import lora_multi_slot_reference
from pallas_kernels.ragged_paged_attention import (
    dense_causal_attention_reference,
    ragged_paged_attention_reference,
)


@pytest.mark.parametrize("impl,backend,want", [
    ("auto", "cpu", "reference"),
    ("auto", "gpu", "kernel"),
    ("auto", "cuda", "kernel"),
    ("auto", "tpu", "tpu"),
    ("kernel", "gpu", "kernel"),
    ("kernel", "tpu", "tpu"),
    ("reference", "gpu", "reference"),
    ("interpret", "cpu", "interpret"),
])
def test_resolve_impl(impl, backend, want):
    assert resolve_impl(impl, backend) == want


def test_resolve_impl_errors_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_impl("kernel", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_impl("fast", "cpu")
    monkeypatch.setenv(ENV_VAR, "interpret")
    assert select_kernels(backend="cpu").impl == "interpret"
    assert select_kernels("reference", backend="cpu").impl == "reference"  # argument wins
    monkeypatch.delenv(ENV_VAR)
    assert select_kernels().impl == ("reference" if jax.default_backend() == "cpu" else
                                     resolve_impl("auto"))


def test_lora_choices_left_open_are_decided_by_backend():
    """Measured on an H200 (``KernelOptions``' docstrings): a GPU step runs the einsum on
    every step; CPU (reference or interpret) and TPU keep the grouped path behind the
    conditional. A choice made explicitly is kept on every backend."""
    gpu = select_kernels("kernel", backend="gpu").options
    assert (gpu.dense_lora, gpu.skip_unused_lora) == (True, False)
    for impl, backend in (("reference", "cpu"), ("interpret", "cpu"), ("auto", "tpu")):
        options = select_kernels(impl, backend=backend).options
        assert (options.dense_lora, options.skip_unused_lora) == (False, True), impl
    chosen = select_kernels("kernel", KernelOptions(dense_lora=False, skip_unused_lora=True),
                            backend="gpu").options
    assert (chosen.dense_lora, chosen.skip_unused_lora) == (False, True)
    # Built directly, as a test or a sharded TPU fallback does, the choices are decided too.
    assert Kernels(impl="kernel").options.dense_lora is True
    assert Kernels(impl="reference").options.skip_unused_lora is True


def test_planned_paged_attention_in_interpret_mode():
    """What the step will call: metadata planned once, then the drop-in per layer."""
    kernels = select_kernels("interpret", KernelOptions(attention_block_q=4))
    batch = paged_batch(np.random.default_rng(11), "mixed", num_q_per_kv=2,
                        num_kv_heads=2, head_dim=64, page_size=8)
    attention = kernels.plan_paged_attention(batch.seq_ids, batch.positions,
                                             batch.page_tables, num_q_per_kv=2, page_size=8)
    out = jax.jit(attention)(*batch.args)
    assert_close(out, ragged_paged_attention_reference(*batch.args))
    ref_path = select_kernels("reference").plan_paged_attention(
        batch.seq_ids, batch.positions, batch.page_tables, num_q_per_kv=2, page_size=8)
    assert_close(ref_path(*batch.args), ragged_paged_attention_reference(*batch.args))


def test_multi_slot_lora_fn_in_interpret_mode():
    """The ``LoraFn`` (tokens grouped once per step) against the reference one."""
    rng = np.random.default_rng(12)
    slots = [0, -1, 2, 2, 1, -1, 0, 0]
    x, a, b, scale, slot_ids = lora_inputs(rng, slots, num_slots=3, in_dim=32, out_dim=16,
                                           rank=8)
    layer_adapter = {"q_proj": (a, b)}
    for impl in ("interpret", "reference"):
        lora = select_kernels(impl).multi_slot_lora(scale, slot_ids)
        assert lora(layer_adapter, "v_proj", x) is None
        out = jax.jit(lambda x, lora=lora: lora(layer_adapter, "q_proj", x))(x)
        assert_close(out, lora_multi_slot_reference(x, a, b, scale, slot_ids), what=impl)


def test_causal_attention_fn_and_fallback(caplog):
    """The AttentionFn for the backward pieces; a head size the kernel cannot tile (48)
    falls back to the reference with a warning."""
    kernels = select_kernels("interpret")
    rng = np.random.default_rng(13)
    q = jnp.asarray(rng.standard_normal((1, 8, 4, 48), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 8, 2, 48), np.float32))
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        out, carry = kernels.attention_fn()(0, q, k, k, "carry")
    assert carry == "carry" and "falling back" in caplog.text
    assert_close(out, dense_causal_attention_reference(q, k, k))


def test_attention_fn_uses_the_given_fallback_off_the_kernel_path():
    """Without kernels the backward pieces keep their own (query-blocked) attention."""
    calls = []

    def blocked(layer, q, k, v, carry):
        calls.append(layer)
        return q, carry

    q = jnp.ones((1, 4, 2, 64), jnp.float32)
    out, _ = select_kernels("reference").attention_fn(fallback=blocked)(3, q, q, q, None)
    assert calls == [3] and out is q
