"""Adapter onto jax's TPU kernel ``jax.experimental.pallas.ops.tpu.ragged_paged_attention``.

What we found comparing layouts (jax 0.10.2):

- **The KV layout is the kernel's.** The TPU kernel reads *one* cache
  ``kv_pages [P, page_size, 2 * Hkv, Dh]`` with K and V interleaved on the head axis
  (K of head h at ``2h``, V at ``2h + 1``), and that is how ``KVCache`` stores it
  (``[L, P, page_size, 2 * Hkv, Dh]``; ``write_kv_pages`` writes ``2h`` / ``2h + 1``).
  So the cache goes to the kernel as it is: with ``layer`` the stacked cache is viewed
  as ``[L * P, ...]`` (merging leading axes, which moves no data) and the page ids are
  offset by ``layer * P``, as our GPU kernel does. Page and in-page indexing are the
  same (``page_tables`` is its ``page_indices``). No copy of the cache is made
  (``tests/pallas_kernels/test_tpu_kernel.py`` checks the kernel is handed the array
  itself, and the traced program's kernel operand is the cache or that reshape of it).
- **The ragged batch maps cleanly.** It wants ``cu_q_lens [S + 1]`` (token offsets of
  each sequence, tokens sorted by sequence), ``kv_lens [S]`` and ``num_seqs [1]``, and
  assumes each sequence's query tokens are the *last* ``q_len`` positions of its
  context. Our ``TokenBatch`` packs sequences contiguously in seq-id order with
  consecutive positions ending at the highest written one, so
  ``kv_len = last position + 1`` and ``cu_q_lens`` are counts of real tokens. The
  trailing padding tokens (sequence 0, position 0) are not part of any sequence there;
  the adapter drops them from the counts and returns zeros for them (the reference gives
  them attention over position 0 of sequence 0; the step discards both).
- **Constraints of the TPU kernel** (``tpu_kernel_supports``; the dispatch falls back to
  the jnp path for other shapes): ``head_dim`` a multiple of 128 (its softmax
  statistics are 128 lanes wide and are broadcast onto ``head_dim`` columns; smaller
  heads fail an assertion while tracing), ``2 * Hkv`` in (2, 4, 8) or a multiple of 8
  for float32 (``Hkv`` so for bfloat16, which packs two per row), float32/bfloat16. Block
  sizes come from its tuned table, which asks the device for its TPU version: off TPU,
  pass ``num_kv_pages_per_block`` and ``num_queries_per_block``.
- **Running it on CPU.** ``interpret=True`` runs the kernel under Pallas' TPU interpret
  mode (``pltpu.force_tpu_interpret_mode``, which the kernel's own ``pallas_call``
  picks up; it has no ``interpret`` argument). jax 0.10.2's TPU interpreter cannot run
  this kernel: the kernel reshapes its VMEM buffer ref before its strided K/V loads
  and the interpreter's reads only handle indexers (``AttributeError:
  'ReshapeTransform' object has no attribute 'indices'`` in
  ``jax/_src/pallas/mosaic/interpret/utils.py:to_range``); the generic interpreter
  (``interpret=True`` on the ``pallas_call``) fails on the kernel's scalar stores
  (``'TypedInt' object has no attribute 'shape'`` in ``_swap_discharge_rule``). The
  tests run the interpreter and expect exactly that failure on such a jax (so a jax
  that can interpret it makes the test a numerical check), and check the rest on CPU:
  the inputs against jax's own jnp reference of the kernel and its input validation,
  the cache handed over uncopied, and the step traced through the real kernel at
  Llama-3.1-8B shapes. (Lowering it to Mosaic asks for a TPU device kind: not on CPU.)
"""

from __future__ import annotations

import contextlib

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


def tpu_kernel_supports(head_dim: int, num_q_heads: int, num_kv_heads: int, q_dtype,
                        kv_dtype) -> bool:
    """Whether jax's TPU kernel takes these shapes: ``head_dim`` a multiple of 128 and head
    counts its blocks can tile (asked of the kernel's own ``get_min_heads_per_blk``)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as tpu_kernel

    if head_dim % 128 or num_q_heads % num_kv_heads:
        return False
    try:
        tpu_kernel.get_min_heads_per_blk(num_q_heads, 2 * num_kv_heads, q_dtype, kv_dtype)
    except ValueError:  # "Not implemented: ... can not be XLA fully tiled"
        return False
    return True


def tpu_kernel_inputs(
    q: jax.Array,  # [T, Hq, Dh]
    kv_pages: jax.Array,  # [P, page_size, 2 * Hkv, Dh], or [L, P, ...] with `layer`
    page_tables: jax.Array,  # [S, W]
    seq_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
    *,
    layer: jax.Array | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The TPU kernel's positional inputs ``(q, kv_pages, kv_lens, page_indices,
    cu_q_lens, num_seqs)`` for our batch, and the ``[T]`` mask of real tokens.

    ``kv_pages`` is passed on as it is; with ``layer``, as the ``[L * P, ...]`` view of
    the stacked cache with page ids offset to the layer's pages."""
    num_seqs = page_tables.shape[0]
    page_indices = page_tables.astype(jnp.int32)
    if layer is not None:
        num_layers, num_pages = kv_pages.shape[:2]
        kv_pages = kv_pages.reshape(num_layers * num_pages, *kv_pages.shape[2:])
        page_indices = page_indices + jnp.asarray(layer, jnp.int32) * num_pages
    real = real_token_mask(seq_ids, positions)
    seg = jnp.where(real, seq_ids, num_seqs)
    q_lens = jax.ops.segment_sum(real.astype(jnp.int32), seg, num_segments=num_seqs + 1)
    kv_lens = jax.ops.segment_max(jnp.where(real, positions + 1, 0), seg,
                                  num_segments=num_seqs + 1)
    kv_lens = jnp.maximum(kv_lens[:num_seqs], 0).astype(jnp.int32)
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                 jnp.cumsum(q_lens[:num_seqs]).astype(jnp.int32)])
    inputs = (q, kv_pages, kv_lens, page_indices, cu_q_lens,
              jnp.array([num_seqs], jnp.int32))
    return inputs, real


def tpu_ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    page_tables: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    scale: float | None = None,
    *,
    layer: jax.Array | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``ragged_paged_attention_reference``'s contract on jax's TPU kernel (TPU; CPU with
    ``interpret=True`` where the installed jax's TPU interpreter can run it). The cache
    is handed to the kernel uncopied. Padding tokens come back as zeros."""
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as tpu_rpa

    scale = float(1.0 / np.sqrt(q.shape[-1])) if scale is None else float(scale)
    inputs, real = tpu_kernel_inputs(q, kv_pages, page_tables, seq_ids, positions,
                                     layer=layer)
    mode = contextlib.nullcontext()
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        mode = pltpu.force_tpu_interpret_mode(pltpu.InterpretParams())
    with mode:
        out = tpu_rpa.ragged_paged_attention(
            *inputs, sm_scale=scale, num_kv_pages_per_block=num_kv_pages_per_block,
            num_queries_per_block=num_queries_per_block, vmem_limit_bytes=vmem_limit_bytes)
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
