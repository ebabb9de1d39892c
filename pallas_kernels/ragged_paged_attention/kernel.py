"""Ragged paged attention as a Pallas kernel (GPU/Triton lowering; interpretable on CPU).

Same contract as ``ragged_paged_attention_reference``: a flat ragged batch of tokens
from many sequences (decode rows, prefill chunks, finetuning windows), each attending
causally to its own sequence's K/V through a page table, with GQA.

How the ragged batch becomes a grid
-----------------------------------
The grid is ``(query block, kv head)``. A query block holds up to ``block_q`` tokens of
*one* sequence (a run of equal ``seq_ids``) times the ``G = Hq // Hkv`` query heads that
share the kv head, so one program reads each K/V page of its sequence once for all of
them (rows = ``block_q * G``). Sequences start anywhere in the batch, so the tokens are
first gathered into a block-aligned layout: token ``t`` goes to row ``dest[t]`` where a
new block starts at every sequence boundary and every ``block_q`` tokens within one.
That layout has a fixed number of blocks, ``NB = min(T, cdiv(T, block_q) + S + 1)``
(each of the at most ``S + 1`` runs - the sequences and the trailing padding - wastes
less than one block), so everything here has static shapes and is computed on device
from ``seq_ids``/``positions``/``page_tables`` by ``ragged_attention_metadata``: once per
step, reused by every layer.

Inside a program, the kernel walks the sequence's pages ``pages_per_block`` at a time
(flash-attention online softmax in float32), up to the block's highest position; per-row
positions give the causal mask, so a block mixes rows at different positions freely
(chunks that continue a cached prefix, padding rows).

GPU notes: K/V pages are indexed through a whole-array BlockSpec (on Triton that is just
a base pointer) and gathered ``pages_per_block`` pages per load. The cache holds K and V
combined on the head axis (K of kv head ``h`` at ``2h``, V at ``2h + 1``); it is passed
twice, as the K operand with block index ``2h`` on that axis and as the V operand with
``2h + 1``, so each program reads its head's K and V straight from the cache (strided
addresses, no split copy); every loaded tile has
power-of-two sizes (``block_q * G``, ``page_size``, ``head_dim``), which Triton requires,
and every matmul is at least 16 on each side when the defaults are used.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MASK_VALUE,
    MIN_TILE,
    cdiv,
    compiler_params_kwargs,
    dot,
    is_power_of_2,
    next_power_of_2,
    online_softmax_step,
    round_up,
)


class RaggedAttentionMetadata(NamedTuple):
    """Block layout of one step's ragged batch; a pytree of int32 arrays with static shapes.

    Depends only on ``seq_ids``, ``positions``, ``page_tables`` and the block sizes, so the
    step computes it once and every layer reuses it.
    """

    dest: jax.Array  # [T]: row of each token in the block layout
    src: jax.Array  # [NB * block_q]: token of each row; T for an empty row
    row_pos: jax.Array  # [NB * block_q]: position of each row; -1 for an empty row
    kv_len: jax.Array  # [NB]: keys the block must read (its highest position + 1)
    block_tables: jax.Array  # [NB, Wp]: the page table of the block's sequence, padded

    @property
    def num_blocks(self) -> int:
        return self.kv_len.shape[0]

    @property
    def block_q(self) -> int:
        return self.row_pos.shape[0] // self.kv_len.shape[0]


def default_block_q(num_q_per_kv: int, num_tokens: int | None = None,
                    num_seqs: int | None = None) -> int:
    """Tokens per query block, from static shapes only.

    A block's rows are its tokens times the (power-of-two padded) head group. About 64
    rows makes a good Triton tile for prefill chunks and windows; but a decode row fills
    one block alone, so when the batch shape says tokens per sequence are few (a decode
    bucket, ``num_tokens <= 2 * num_seqs``) blocks shrink towards 16 rows, the smallest
    tensor-core tile, to waste less compute on empty rows (decode reads each sequence's
    K/V once either way).
    """
    g = next_power_of_2(num_q_per_kv)
    rows = 64
    if num_tokens is not None and num_seqs is not None and num_tokens <= 2 * num_seqs:
        rows = 16
    return max(1, rows // g)


def default_pages_per_block(page_size: int) -> int:
    """Pages per kv step: ~64 keys per step (at least one page)."""
    return max(1, 64 // page_size)


def max_query_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Blocks of the layout: every run of one sequence (at most ``num_seqs`` of them plus
    the trailing padding run) starts a block, and a block never holds fewer than one token."""
    return max(1, min(num_tokens, cdiv(num_tokens, block_q) + num_seqs + 1))


def ragged_attention_metadata(
    seq_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    page_tables: jax.Array,  # [S, W] int32
    *,
    block_q: int,
    pages_per_block: int,
) -> RaggedAttentionMetadata:
    """The block layout of a ragged batch, in jnp with fixed shapes (jit/device friendly).

    Requires the ``TokenBatch`` invariant: tokens of one sequence are contiguous (the
    padding tokens at the end form one more run). More runs than ``S + 1`` would not fit
    the layout and their tokens would come back as zeros.
    """
    if not is_power_of_2(block_q) or not is_power_of_2(pages_per_block):
        raise ValueError(f"block_q ({block_q}) and pages_per_block ({pages_per_block}) "
                         "must be powers of two")
    t = seq_ids.shape[0]
    num_seqs, width = page_tables.shape
    nb = max_query_blocks(t, num_seqs, block_q)
    rows = nb * block_q
    seq_ids = seq_ids.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    idx = jnp.arange(t, dtype=jnp.int32)
    run_start = jnp.concatenate([jnp.ones((1,), bool), seq_ids[1:] != seq_ids[:-1]])
    run_first = lax.cummax(jnp.where(run_start, idx, 0), axis=0)
    offset = idx - run_first  # index of the token within its run
    # A block starts at every run start and every block_q tokens within a run, so the
    # block of a token is the number of block starts up to it.
    block = jnp.cumsum((offset % block_q == 0).astype(jnp.int32)) - 1
    dest = block * block_q + offset % block_q
    src = jnp.full((rows,), t, jnp.int32).at[dest].set(idx, mode="drop")
    row_pos = jnp.take(positions, src, mode="fill", fill_value=-1)
    kv_len = jnp.max(row_pos.reshape(nb, block_q), axis=1) + 1
    block_seq = jnp.take(seq_ids, src[::block_q], mode="fill", fill_value=0)
    tables = jnp.take(page_tables.astype(jnp.int32), block_seq, axis=0, mode="clip")
    padded_width = round_up(width, pages_per_block)
    # Padding columns point at page 0; the context limit masks whatever they read.
    tables = jnp.pad(tables, ((0, 0), (0, padded_width - width)))
    return RaggedAttentionMetadata(dest=dest, src=src, row_pos=row_pos, kv_len=kv_len,
                                   block_tables=tables)


def _paged_kernel(kv_len_ref, pos_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *,
                  scale: float, pages_per_block: int, context: int):
    """One (query block, kv head): online softmax over the block's sequence's pages."""
    block_q, groups, head_dim = q_ref.shape
    rows = block_q * groups
    page_size = k_ref.shape[1]
    block_kv = pages_per_block * page_size
    q = q_ref[...].reshape(rows, head_dim)
    # Row r is token r // groups: every grouped head of a token shares its position.
    row_pos = jnp.broadcast_to(pos_ref[...][:, None], (block_q, groups)).reshape(rows, 1)
    num_steps = jnp.minimum(pl.cdiv(kv_len_ref[0], block_kv),
                            tables_ref.shape[0] // pages_per_block)

    def body(j, carry):
        acc, m, l = carry
        pages = tables_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        s = dot(q, k, trans_b=True) * scale  # [rows, block_kv] float32
        key_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        visible = (key_pos <= row_pos) & (key_pos < context)
        return online_softmax_step(acc, m, l, s, visible, v)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, l = lax.fori_loop(0, num_steps, body, init)
    # Empty rows (no token) saw nothing: divide by 1 rather than 0 to keep them finite.
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    o_ref[...] = out.reshape(block_q, groups, head_dim).astype(o_ref.dtype)


def kernel_supports(head_dim: int, page_size: int) -> bool:
    """Whether the Triton tiles can be formed: power-of-two head and page sizes."""
    return is_power_of_2(head_dim) and is_power_of_2(page_size)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "interpret",
                                             "num_warps", "num_stages"))
def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, Dh]
    kv_pages: jax.Array,  # [P, page_size, 2 * Hkv, Dh], or [L, P, ...] with `layer`
    page_tables: jax.Array,  # [S, W] int32
    seq_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    scale: float | None = None,
    *,
    layer: jax.Array | None = None,
    metadata: RaggedAttentionMetadata | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Causal GQA attention of each token over its own sequence's pages: ``[T, Hq, Dh]``.

    A drop-in for ``ragged_paged_attention_reference`` (same positional arguments and
    result). Extras:

    - ``layer``: pass the whole stacked cache ``[L, P, ...]`` and the layer index instead of
      ``kv_pages[layer]``; the kernel then offsets page ids by ``layer * P`` rather than
      having XLA copy the layer's pages out for the custom call.
    - ``metadata``: the block layout from ``ragged_attention_metadata`` (compute it once
      per step; it is recomputed here when absent). Its ``block_q`` wins over the argument.
    - ``block_q`` / ``pages_per_block``: tile sizes (powers of two); see the defaults.
    - ``interpret``: run the Pallas interpreter (CPU tests).
    """
    t, hq, dh = q.shape
    if layer is not None:
        num_layers, num_pages = kv_pages.shape[:2]
        kv_pages = kv_pages.reshape(num_layers * num_pages, *kv_pages.shape[2:])
        page_offset = jnp.asarray(layer, jnp.int32) * num_pages
    else:
        page_offset = None
    total_pages, page_size, hkv2, _ = kv_pages.shape
    hkv = hkv2 // 2
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not kernel_supports(dh, page_size):
        raise ValueError(f"the kernel needs power-of-two head_dim and page_size, got "
                         f"{dh} and {page_size}")
    groups = hq // hkv
    gp = next_power_of_2(groups)
    scale = float(1.0 / np.sqrt(dh)) if scale is None else float(scale)
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size)
    if metadata is None:
        metadata = ragged_attention_metadata(
            seq_ids, positions, page_tables,
            block_q=default_block_q(groups, t, page_tables.shape[0]) if block_q is None
            else block_q,
            pages_per_block=pages_per_block)
    nb, bq = metadata.num_blocks, metadata.block_q
    tables = metadata.block_tables
    if tables.shape[1] % pages_per_block:
        raise ValueError("metadata was built for a different pages_per_block")
    if not interpret and (bq * gp < MIN_TILE or pages_per_block * page_size < MIN_TILE
                          or dh < MIN_TILE):
        raise ValueError(f"Triton needs matmul sides >= {MIN_TILE}: block_q * group = "
                         f"{bq * gp}, pages_per_block * page_size = "
                         f"{pages_per_block * page_size}, head_dim = {dh}")
    if page_offset is not None:
        tables = tables + page_offset
    context = page_tables.shape[1] * page_size  # what the reference can see

    # Block layout of the queries: [NB * block_q, Hkv, Gp, Dh], heads of a kv group
    # adjacent (padded to a power of two with zero heads whose rows are dropped).
    qg = q.reshape(t, hkv, groups, dh)
    if gp != groups:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - groups), (0, 0)))
    q_blocks = jnp.take(qg, metadata.src, axis=0, mode="fill", fill_value=0)

    kernel = functools.partial(_paged_kernel, scale=scale, pages_per_block=pages_per_block,
                               context=context)
    out = pl.pallas_call(
        kernel,
        grid=(nb, hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (i,)),  # kv_len
            pl.BlockSpec((bq,), lambda i, h: (i,)),  # row positions
            pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)),  # block tables
            pl.BlockSpec((bq, None, gp, dh), lambda i, h: (i, h, 0, 0)),  # q
            # The combined cache twice: K of head h at 2h, V at 2h + 1.
            pl.BlockSpec((total_pages, page_size, None, dh), lambda i, h: (0, 0, 2 * h, 0)),
            pl.BlockSpec((total_pages, page_size, None, dh),
                         lambda i, h: (0, 0, 2 * h + 1, 0)),
        ],
        out_specs=pl.BlockSpec((bq, None, gp, dh), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((nb * bq, hkv, gp, dh), q.dtype),
        interpret=interpret,
        name="ragged_paged_attention",
        **compiler_params_kwargs(interpret, num_warps, num_stages),
    )(metadata.kv_len, metadata.row_pos, tables, q_blocks, kv_pages, kv_pages)
    out = out[:, :, :groups].reshape(nb * bq, hq, dh)
    # Every real token has a row; tokens the layout could not hold (invariant broken) get 0.
    return jnp.take(out, metadata.dest, axis=0, mode="fill", fill_value=0)
