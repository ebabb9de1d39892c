"""Adapter onto jax's TPU kernel ``jax.experimental.pallas.ops.tpu.ragged_paged_attention``.

What we found comparing layouts (jax 0.10.2):

- **KV layout does not fit as is.** The TPU kernel reads *one* cache
  ``kv_pages [P, page_size, 2 * Hkv, Dh]`` with K and V interleaved on the head axis
  (K of head h at ``2h``, V at ``2h + 1``); ours keeps K and V as two arrays
  ``[P, page_size, Hkv, Dh]``. Page and in-page indexing are the same (``page_tables``
  is its ``page_indices``), so the adapter interleaves ``stack([k, v], axis=3)`` - a copy
  of the whole layer's cache on every call. That is only cheap when the page pool is
  about the size of the batch's context; the real fix is to store the cache combined
  (``[L, P, page_size, 2 * Hkv, Dh]``; ``write_kv_pages`` would write ``2h`` / ``2h + 1``)
  and pass it straight through (``kv_pages=``).
- **The ragged batch maps cleanly.** It wants ``cu_q_lens [S + 1]`` (token offsets of
  each sequence, tokens sorted by sequence), ``kv_lens [S]`` and ``num_seqs [1]``, and
  assumes each sequence's query tokens are the *last* ``q_len`` positions of its
  context. Our ``TokenBatch`` packs sequences contiguously in seq-id order with
  consecutive positions ending at the highest written one, so
  ``kv_len = last position + 1`` and ``cu_q_lens`` are counts of real tokens. The
  trailing padding tokens (sequence 0, position 0) are not part of any sequence there;
  the adapter drops them from the counts and returns zeros for them (the reference gives
  them attention over position 0 of sequence 0; the step discards both).
- Constraints of the TPU kernel (not checked here): ``head_dim`` a multiple of 128 for
  good tiling, page_size and block sizes from its tuned table, float32/bfloat16.

None of this can run here (CPU only): ``tpu_kernel_inputs`` is checked on CPU against
jax's own jnp reference of that kernel (``ref_ragged_paged_attention``), which validates
the mapping; the kernel call itself is untested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def real_token_mask(seq_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """``[T]`` bool: tokens that belong to a sequence's run, not the trailing padding.

    Real tokens come in runs of one sequence with consecutive positions and sequence ids
    that never go back; the padding tokens (sequence 0 at position 0 after the others)
    break that, so a token is real while the ids are non-decreasing and each repeat of an
    id continues its positions.
    """
    prev_seq = jnp.concatenate([jnp.full((1,), -1, seq_ids.dtype), seq_ids[:-1]])
    prev_pos = jnp.concatenate([jnp.full((1,), -1, positions.dtype), positions[:-1]])
    ok = (seq_ids > prev_seq) | ((seq_ids == prev_seq) & (positions == prev_pos + 1))
    return jnp.cumprod(ok.astype(jnp.int32)).astype(bool)


def tpu_kernel_inputs(
    q: jax.Array,  # [T, Hq, Dh]
    k_pages: jax.Array,  # [P, page_size, Hkv, Dh]
    v_pages: jax.Array,  # [P, page_size, Hkv, Dh]
    page_tables: jax.Array,  # [S, W]
    seq_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The TPU kernel's positional inputs ``(q, kv_pages, kv_lens, page_indices,
    cu_q_lens, num_seqs)`` for our batch, and the ``[T]`` mask of real tokens."""
    num_pages, page_size, hkv, dh = k_pages.shape
    num_seqs = page_tables.shape[0]
    # Head h of K at 2h and of V at 2h + 1: the kernel's combined layout.
    kv_pages = jnp.stack([k_pages, v_pages], axis=3).reshape(num_pages, page_size, 2 * hkv, dh)
    real = real_token_mask(seq_ids, positions)
    seg = jnp.where(real, seq_ids, num_seqs)
    q_lens = jax.ops.segment_sum(real.astype(jnp.int32), seg, num_segments=num_seqs + 1)
    kv_lens = jax.ops.segment_max(jnp.where(real, positions + 1, 0), seg,
                                  num_segments=num_seqs + 1)
    kv_lens = jnp.maximum(kv_lens[:num_seqs], 0).astype(jnp.int32)
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                 jnp.cumsum(q_lens[:num_seqs]).astype(jnp.int32)])
    inputs = (q, kv_pages, kv_lens, page_tables.astype(jnp.int32), cu_q_lens,
              jnp.array([num_seqs], jnp.int32))
    return inputs, real


def tpu_ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    scale: float | None = None,
    *,
    layer: jax.Array | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:
    """``ragged_paged_attention_reference``'s contract on jax's TPU kernel (TPU only).
    Padding tokens come back as zeros. See the module notes for the copy it makes."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ragged_paged_attention as tpu_kernel,
    )

    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    scale = float(1.0 / np.sqrt(q.shape[-1])) if scale is None else float(scale)
    inputs, real = tpu_kernel_inputs(q, k_pages, v_pages, page_tables, seq_ids, positions)
    out = tpu_kernel(*inputs, sm_scale=scale, num_kv_pages_per_block=num_kv_pages_per_block,
                     num_queries_per_block=num_queries_per_block,
                     vmem_limit_bytes=vmem_limit_bytes)
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
