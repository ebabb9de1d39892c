"""The compiled (non-interpret) kernels lower through Pallas' Triton backend for CUDA.

No GPU is needed: ``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs the
Pallas -> Triton IR lowering on the host, which checks every rule the kernels use
(power-of-two tiles, matmul shapes, ref indexing, loops) at Llama-3.1-8B-like shapes in
bfloat16. What it cannot check is Triton's own compile to PTX and the run itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import KernelOptions, Kernels

S = jax.ShapeDtypeStruct
BF16, I32 = jnp.bfloat16, jnp.int32
TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    try:
        traced = jax.jit(fn).trace(*args)
    except AttributeError:  # pragma: no cover - a jax without .trace()
        pytest.skip("this jax cannot lower for another platform")
    return traced.lower(lowering_platforms=("cuda",)).as_text()


# The grouped LoRA kernel named explicitly: a GPU engine runs the einsum by default.
GPU = Kernels(impl="kernel", options=KernelOptions(dense_lora=False))


# (query heads, kv heads, page size, tokens): Llama-3.1-8B, Qwen2.5-7B (group of 7),
# no GQA; 8 tokens over 8 sequences is a decode bucket (16-row blocks).
@pytest.mark.parametrize("hq,hkv,page_size,t", [(32, 8, 16, 64), (32, 8, 16, 8),
                                                 (28, 4, 8, 64), (8, 8, 16, 8)])
def test_paged_attention_lowers_to_triton(hq, hkv, page_size, t):
    dh, pages, seqs, width = 128, 64, 8, 12
    args = (S((t, hq, dh), BF16), S((2, pages, page_size, 2 * hkv, dh), BF16),
            S((seqs, width), I32), S((t,), I32), S((t,), I32))

    def step(q, kv, tables, seq_ids, positions):
        attention = GPU.plan_paged_attention(seq_ids, positions, tables,
                                             num_q_per_kv=hq // hkv, page_size=page_size)
        return attention(q, kv, tables, seq_ids, positions, layer=jnp.int32(1))

    text = lower_for_cuda(step, *args)
    assert text.count(TRITON_CALL) == 1


def test_flash_attention_fwd_bwd_lowers_to_triton():
    b, length, hq, hkv, dh = 1, 256, 32, 8, 128

    def fwd_bwd(q, k, v, w):
        out, pullback = jax.vjp(GPU.causal_attention, q, k, v)
        return out, pullback(w)

    text = lower_for_cuda(fwd_bwd, S((b, length, hq, dh), BF16), S((b, length, hkv, dh), BF16),
                          S((b, length, hkv, dh), BF16), S((b, length, hq, dh), BF16))
    assert text.count(TRITON_CALL) == 3  # forward, dq, dk/dv


def test_lora_fwd_bwd_lowers_to_triton():
    t, din, dout, n, rank = 64, 4096, 1024, 4, 16

    def fwd_bwd(x, a, b, scale, slot_ids, w):
        lora = GPU.multi_slot_lora(scale, slot_ids)
        out, pullback = jax.vjp(lambda x, a, b: lora({"v_proj": (a, b)}, "v_proj", x), x, a, b)
        return out, pullback(w)

    text = lower_for_cuda(fwd_bwd, S((t, din), BF16), S((n, din, rank), BF16),
                          S((n, rank, dout), BF16), S((n,), jnp.float32), S((t,), I32),
                          S((t, dout), BF16))
    assert text.count(TRITON_CALL) == 6  # shrink, expand; dh, dx, dA, dB
