"""Ragged paged attention in plain jnp for where no kernel runs (CPU, sharded programs).

The reference (``reference.py``) scores every token against every sequence's context and
masks the rest: ``num_seqs`` times the needed work, which is cheap while a batch holds a
few sequences but dominates a co-serving step on CPU, where a batch holds many decoding
requests beside finetuning windows. ``ragged_paged_attention_by_token`` does only the
needed work: it gathers each sequence's context once, then scores each block of tokens
against its own tokens' contexts. The gathered per-token context costs memory traffic the
reference does not have, so ``ragged_paged_attention_xla`` picks between the two from the
static shapes at trace time. Both compute the same function; tests hold them to the
reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    split_kv,
)

# Sequences per batch from which scoring only each token's own context wins over the
# reference's all-sequences scoring (measured on CPU for head sizes 64-128: the reference
# is faster at 4 sequences, even at 8, and 2-4x slower at 16).
BY_TOKEN_MIN_SEQS = 16
TOKEN_BLOCK = 16


def ragged_paged_attention_by_token(
    q: jax.Array,  # [T, Hq, Dh]
    kv_pages: jax.Array,  # [P, page_size, 2 * Hkv, Dh], K of head h at 2h, V at 2h + 1
    page_tables: jax.Array,  # [num_seqs, W] int32
    seq_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    scale: float | None = None,
    block: int = TOKEN_BLOCK,
) -> jax.Array:
    """The reference's function with ``T * W * page_size`` scores instead of
    ``T * num_seqs * W * page_size``: ``[T, Hq, Dh]``. Tokens go in blocks of ``block``
    (``lax.map``) so each block's gathered contexts stay small."""
    t, hq, dh = q.shape
    _, page_size, hkv2, _ = kv_pages.shape
    hkv = hkv2 // 2
    num_seqs, width = page_tables.shape
    ctx = width * page_size
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    k_seq, v_seq = split_kv(kv_pages[page_tables].reshape(num_seqs, ctx, hkv2, dh))
    block = min(block, t)
    pad = -t % block

    def padded(x):
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    def one_block(args):
        qb, sb, pb = args  # [block, Hq, Dh], [block], [block]
        k, v = k_seq[sb], v_seq[sb]  # [block, C, Hkv, Dh]
        qg = qb.reshape(block, hkv, hq // hkv, dh)
        scores = jnp.einsum("tkgd,tckd->tkgc", qg, k,
                            preferred_element_type=jnp.float32) * scale
        causal = jnp.arange(ctx)[None, :] <= pb[:, None]  # [block, C]
        scores = jnp.where(causal[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("tkgc,tckd->tkgd", probs.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        return out.reshape(block, hq, dh)

    blocks = (padded(q).reshape(-1, block, hq, dh), padded(seq_ids).reshape(-1, block),
              padded(positions).reshape(-1, block))
    out = jax.lax.map(one_block, blocks).reshape(t + pad, hq, dh)
    return out[:t].astype(q.dtype)


def ragged_paged_attention_xla(q, kv_pages, page_tables, seq_ids, positions,
                               scale=None) -> jax.Array:
    """The cheaper of the two exact jnp formulations for this batch shape (static)."""
    if page_tables.shape[0] >= BY_TOKEN_MIN_SEQS:
        return ragged_paged_attention_by_token(q, kv_pages, page_tables, seq_ids,
                                               positions, scale)
    return ragged_paged_attention_reference(q, kv_pages, page_tables, seq_ids,
                                            positions, scale)
