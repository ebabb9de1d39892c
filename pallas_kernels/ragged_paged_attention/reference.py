"""Plain-jnp ragged paged attention: the definition every kernel is held against.

Layout (shared with the KV cache and the token batch):

- ``k_pages``/``v_pages``: ``[num_pages, page_size, num_kv_heads, head_dim]``
  for one layer. Position ``p`` of a sequence lives in page
  ``page_table[p // page_size]`` at offset ``p % page_size``.
- Tokens are a flat ragged list ``[T]``; token ``t`` belongs to sequence
  ``seq_ids[t]`` at position ``positions[t]`` and attends causally to
  positions ``0..positions[t]`` of its own sequence, all of which must already
  be written (``write_kv_pages`` runs first in the same layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def write_kv_pages(
    k_pages: jax.Array,  # [P, S, Hkv, Dh], or [L, P, S, Hkv, Dh] with `layer`
    v_pages: jax.Array,  # same shape as k_pages
    k: jax.Array,  # [T, Hkv, Dh]
    v: jax.Array,  # [T, Hkv, Dh]
    slots: jax.Array,  # [T] int32: page * page_size + offset; -1 for padding
    layer: jax.Array | None = None,  # scalar int32 when the pages of all layers are passed
) -> tuple[jax.Array, jax.Array]:
    """Scatters the new tokens' K/V into their slots in place; padding slots are dropped.

    Passing all layers with a layer index lets the step update the stacked
    cache in place rather than copying one layer's pages out and back.
    """
    num_pages, page_size = k_pages.shape[-4:-2]
    # Padding slots point past the last page; mode="drop" discards them.
    page = jnp.where(slots < 0, num_pages, slots // page_size)
    index = (page, slots % page_size) if layer is None else (layer, page, slots % page_size)
    k_pages = k_pages.at[index].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[index].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, Hq, Dh]
    k_pages: jax.Array,  # [P, S, Hkv, Dh]
    v_pages: jax.Array,  # [P, S, Hkv, Dh]
    page_tables: jax.Array,  # [num_seqs, W] int32
    seq_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention of each token over its own sequence's pages: ``[T, Hq, Dh]``.

    Each sequence's pages are gathered once (``[num_seqs, W * page_size]``), every
    token is scored against every sequence's context, and the softmax runs over
    the joint (sequence, position) axis with everything outside the token's own
    sequence and causal window masked. That costs ``num_seqs`` times the needed
    scores but no per-token copy of the context, which is what makes this
    reference usable on CPU; the kernels do only the needed work.
    """
    t, hq, dh = q.shape
    _, page_size, hkv, _ = k_pages.shape
    num_seqs, width = page_tables.shape
    ctx = width * page_size
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    k = k_pages[page_tables].reshape(num_seqs, ctx, hkv, dh)
    v = v_pages[page_tables].reshape(num_seqs, ctx, hkv, dh)
    qg = q.reshape(t, hkv, hq // hkv, dh)
    scores = jnp.einsum("tkgd,sckd->tkgsc", qg, k, preferred_element_type=jnp.float32) * scale
    own = seq_ids[:, None] == jnp.arange(num_seqs)[None, :]  # [T, S]
    causal = jnp.arange(ctx)[None, :] <= positions[:, None]  # [T, C]
    visible = own[:, :, None] & causal[:, None, :]  # [T, S, C]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    scores = scores.reshape(t, hkv, hq // hkv, num_seqs * ctx)
    probs = jax.nn.softmax(scores, axis=-1).reshape(t, hkv, hq // hkv, num_seqs, ctx)
    out = jnp.einsum("tkgsc,sckd->tkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(t, hq, dh).astype(q.dtype)


def dense_causal_attention_reference(
    q: jax.Array,  # [B, L, Hq, Dh]
    k: jax.Array,  # [B, L, Hkv, Dh]
    v: jax.Array,  # [B, L, Hkv, Dh]
    scale: float | None = None,
) -> jax.Array:
    """Plain causal GQA self-attention over whole sequences: ``[B, L, Hq, Dh]``.

    The definition of the flash kernel pair the finetuning backward pieces use; the same
    computation as ``coserve_jax.models.llama.dense_causal_attention`` with no query offset
    (kept here so this package depends only on jax).
    """
    b, length, hq, dh = q.shape
    hkv = k.shape[2]
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    qg = q.reshape(b, length, hkv, hq // hkv, dh)
    scores = jnp.einsum("bqkgd,bckd->bkgqc", qg, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqc,bckd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, length, hq, dh).astype(q.dtype)
