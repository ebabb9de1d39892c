"""The dispatch's planned attention and LoRA are drop-ins inside the real layer stack."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from kernel_cases import assert_close

from coserve_jax.batch import Bucket, SeqChunk, build_batch
from coserve_jax.kv_cache import KVCache
from coserve_jax.lora.adapter import module_shape
from coserve_jax.models import llama
from pallas_kernels import combine_kv, select_kernels, write_kv_pages

from support import tiny_model

PAGE_SIZE = 8


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step_logits(cfg, impl, params, adapters, scale, kv, batch):
    """What the step will do: plan once per batch, outside the layer scan."""
    kernels = select_kernels(impl)
    attention = kernels.plan_paged_attention(
        batch.seq_ids, batch.positions, batch.page_tables,
        num_q_per_kv=cfg.num_heads // cfg.num_kv_heads, page_size=kv.page_size)
    lora = kernels.multi_slot_lora(scale, batch.adapter_slots)
    x, kv, _ = llama.forward_paged(cfg, params, kv, batch, attention, write_kv_pages,
                                   adapters=adapters, lora=lora)
    return llama.lm_head(params, llama.final_norm(cfg, params, x))


def test_tiny_model_step_kernels_equal_reference():
    model = tiny_model()
    cfg = model.config
    rng = np.random.default_rng(0)
    num_slots, rank = 2, 8
    adapters = {}
    for m in ("q_proj", "v_proj", "down_proj"):
        fan_in, fan_out = module_shape(cfg, m)
        adapters[m] = tuple(jnp.asarray(rng.standard_normal(s, np.float32) * 0.05, model.dtype)
                            for s in ((cfg.num_layers, num_slots, fan_in, rank),
                                      (cfg.num_layers, num_slots, rank, fan_out)))
    scale = jnp.asarray([2.0, 0.5], jnp.float32)
    # A prefill chunk continuing a cached prefix, a fresh prompt and a decode row, with
    # adapters 0, none and 1; the pages of the prefix hold random K/V.
    chunks = [SeqChunk(rng.integers(3, 300, 9).tolist(), 5, [3, 0], adapter_slot=0),
              SeqChunk(rng.integers(3, 300, 6).tolist(), 0, [1]),
              SeqChunk(rng.integers(3, 300, 1).tolist(), 12, [2, 4], adapter_slot=1)]
    batch = build_batch(chunks, Bucket(num_tokens=24, num_seqs=4, num_pages=2), PAGE_SIZE)
    kv = KVCache.zeros(cfg, 6, PAGE_SIZE, model.dtype)
    half = (*kv.pages.shape[:3], cfg.num_kv_heads, cfg.head_dim)  # K or V alone
    k, v = (jnp.asarray(rng.standard_normal(half, np.float32), kv.pages.dtype) for _ in "kv")
    kv = kv.replace(pages=combine_kv(k, v))
    args = (model.params, adapters, scale, kv, batch)
    ref = _step_logits(cfg, "reference", *args)
    out = _step_logits(cfg, "interpret", *args)
    real = np.asarray(batch.token_mask)
    assert_close(np.asarray(out)[real], np.asarray(ref)[real], tol=1e-5)
