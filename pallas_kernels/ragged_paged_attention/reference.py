"""Plain-jnp ragged paged attention: the definition every kernel is held against.

Layout (shared with the KV cache and the token batch):

- ``kv_pages``: ``[num_pages, page_size, 2 * num_kv_heads, head_dim]`` for one
  layer, K and V combined on the head axis: K of kv head ``h`` at index ``2h``,
  V at ``2h + 1`` (the layout of jax's TPU ragged paged attention kernel, so
  the cache is handed to it as is; ``split_kv``/``combine_kv`` convert). Position
  ``p`` of a sequence lives in page ``page_table[p // page_size]`` at offset
  ``p % page_size``.
- Tokens are a flat ragged list ``[T]``; token ``t`` belongs to sequence
  ``seq_ids[t]`` at position ``positions[t]`` and attends causally to
  positions ``0..positions[t]`` of its own sequence, all of which must already
  be written (``write_kv_pages`` runs first in the same layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def combine_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """``[..., Hkv, Dh]`` K and V as one ``[..., 2 * Hkv, Dh]`` array, K of head h at
    ``2h`` and V at ``2h + 1``."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def split_kv(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The K and V halves ``[..., Hkv, Dh]`` of a combined ``[..., 2 * Hkv, Dh]`` array
    (strided slices of the head axis)."""
    return kv[..., 0::2, :], kv[..., 1::2, :]


def write_kv_pages(
    kv_pages: jax.Array,  # [P, S, 2 * Hkv, Dh], or [L, P, S, 2 * Hkv, Dh] with `layer`
    k: jax.Array,  # [T, Hkv, Dh]
    v: jax.Array,  # [T, Hkv, Dh]
    slots: jax.Array,  # [T] int32: page * page_size + offset; -1 for padding
    layer: jax.Array | None = None,  # scalar int32 when the pages of all layers are passed
) -> jax.Array:
    """Scatters the new tokens' K/V into their slots in place; padding slots are dropped.

    Passing all layers with a layer index lets the step update the stacked
    cache in place rather than copying one layer's pages out and back. K and V
    are interleaved per token (``[T, 2 * Hkv, Dh]``, small) so one scatter writes both.
    """
    num_pages, page_size = kv_pages.shape[-4:-2]
    # Padding slots point past the last page; mode="drop" discards them.
    page = jnp.where(slots < 0, num_pages, slots // page_size)
    index = (page, slots % page_size) if layer is None else (layer, page, slots % page_size)
    return kv_pages.at[index].set(combine_kv(k, v).astype(kv_pages.dtype), mode="drop")


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, Hq, Dh]
    kv_pages: jax.Array,  # [P, S, 2 * Hkv, Dh]
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
    _, page_size, hkv2, _ = kv_pages.shape
    hkv = hkv2 // 2
    num_seqs, width = page_tables.shape
    ctx = width * page_size
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    k, v = split_kv(kv_pages[page_tables].reshape(num_seqs, ctx, hkv2, dh))
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
