"""Grouped multi-LoRA as Pallas kernels (GPU/Triton lowering; interpretable on CPU).

Same contract as ``lora_multi_slot_reference``: token ``t`` gets
``(x[t] @ a[s] @ b[s]) * scale[s]`` for its slot ``s = slot_ids[t]``, zero for ``-1``.

Tokens are grouped by slot once per step (``group_tokens``: one stable sort, fixed
shapes) and every LoRA projection of every layer reuses that grouping:

- the grouped layout has ``NT = min(T, cdiv(T, tile) + N)`` tiles of ``tile`` rows; each
  slot's tokens fill consecutive tiles, so tokens of one adapter *share* tiles (a decode
  batch with five tokens on one adapter uses one tile, not five) and each slot wastes
  less than one tile; tokens without an adapter get no row at all, and unused tiles
  exit at once;
- shrink ``x @ A`` and expand ``h @ B`` are one grouped matmul kernel (``gmm``): grid
  ``(tile, output block)``, each program multiplies its tile by its slot's weight;
- the backward reuses ``gmm`` with transposed weights for ``dh = dy @ B^T`` and
  ``dx = dh @ A^T``, and a grouped transpose product (``gmm_t``: grid
  ``(slot, block, block)``, each program sums ``lhs_tile^T @ rhs_tile`` over its slot's
  consecutive tiles) for the per-adapter ``dA = x^T dh`` and ``dB = h^T dy``.

The rank is zero-padded to a multiple of 16 (the smallest tensor-core tile); allocate the
slot table with such a rank and the padding is free. ``lax.ragged_dot`` computes the same
thing (``lora_ragged_dot``), but XLA's GPU lowering pads it to a dense batched product
over all slots, so it is kept only as a measured alternative.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MIN_TILE,
    cdiv,
    compiler_params_kwargs,
    dot,
    is_power_of_2,
    round_up,
)

RANK_MULTIPLE = MIN_TILE
"""The rank is padded to a multiple of this (Triton's smallest matmul side)."""


class TokenGroups(NamedTuple):
    """Tokens of a batch grouped by adapter slot; int32 arrays with static shapes.

    Computed once per step by ``group_tokens`` and reused by every layer and projection.
    """

    perm: jax.Array  # [T]: token indices sorted by slot (tokens without an adapter last)
    dest: jax.Array  # [T]: row of each token in the grouped layout; NT*tile for none
    src: jax.Array  # [NT * tile]: token of each row; T for an empty row
    tile_slot: jax.Array  # [NT]: slot of each tile; -1 for an unused tile
    group_sizes: jax.Array  # [N]: tokens of each slot
    group_tile_start: jax.Array  # [N]: first tile of each slot
    group_tile_count: jax.Array  # [N]: tiles of each slot

    @property
    def num_tiles(self) -> int:
        return self.tile_slot.shape[0]

    @property
    def tile(self) -> int:
        return self.src.shape[0] // self.tile_slot.shape[0]

    @property
    def row_slot(self) -> jax.Array:
        """``[NT * tile]``: the slot of each row (-1 for rows of unused tiles)."""
        return jnp.repeat(self.tile_slot, self.tile, total_repeat_length=self.src.shape[0])


def max_tiles(num_tokens: int, num_slots: int, tile: int) -> int:
    """Tiles of the grouped layout: each slot wastes less than one tile, and a used tile
    holds at least one token."""
    return max(1, min(num_tokens, cdiv(num_tokens, tile) + num_slots))


def group_tokens(slot_ids: jax.Array, num_slots: int, tile: int) -> TokenGroups:
    """Groups tokens by slot into shared tiles (jnp, fixed shapes; one sort).

    Slot ids outside ``0..num_slots-1`` (``-1`` in particular) mean no adapter.
    """
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    t = slot_ids.shape[0]
    nt = max_tiles(t, num_slots, tile)
    rows = nt * tile
    slot_ids = slot_ids.astype(jnp.int32)
    key = jnp.where((slot_ids >= 0) & (slot_ids < num_slots), slot_ids, num_slots)
    perm = jnp.argsort(key, stable=True).astype(jnp.int32)
    sizes = jnp.zeros((num_slots + 1,), jnp.int32).at[key].add(1)[:num_slots]
    tiles = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    token_start = jnp.cumsum(sizes) - sizes
    sorted_key = key[perm]
    has_slot = sorted_key < num_slots
    rank = jnp.arange(t, dtype=jnp.int32) - jnp.take(token_start, sorted_key, mode="fill",
                                                     fill_value=0)
    dest_sorted = jnp.where(
        has_slot, jnp.take(tile_start, sorted_key, mode="fill", fill_value=0) * tile + rank,
        rows)
    dest = jnp.zeros((t,), jnp.int32).at[perm].set(dest_sorted)
    src = jnp.full((rows,), t, jnp.int32).at[dest].set(jnp.arange(t, dtype=jnp.int32),
                                                       mode="drop")
    slot_of_tile = jnp.searchsorted(tile_end, jnp.arange(nt, dtype=jnp.int32), side="right")
    tile_slot = jnp.where(slot_of_tile < num_slots, slot_of_tile, -1).astype(jnp.int32)
    return TokenGroups(perm=perm, dest=dest, src=src, tile_slot=tile_slot, group_sizes=sizes,
                       group_tile_start=tile_start.astype(jnp.int32),
                       group_tile_count=tiles.astype(jnp.int32))


def _fit(dim: int, target: int) -> tuple[int, int]:
    """(block, padded dim): ``dim`` rounded up to a multiple of 16 and the largest
    power-of-two block <= ``target`` dividing it (Triton tiles are powers of two, >= 16)."""
    padded = round_up(dim, 16)
    block = 16
    while block * 2 <= target and padded % (block * 2) == 0:
        block *= 2
    return block, padded


def _gmm_kernel(slot_ref, lhs_ref, rhs_ref, out_ref, *, block_k: int, transpose_rhs: bool):
    """One tile x one output block: ``lhs_tile @ rhs[slot]`` (or ``@ rhs[slot]^T``)."""
    slot = slot_ref[0]
    k_dim = lhs_ref.shape[1]

    @pl.when(slot < 0)
    def _():  # an unused tile: nothing to multiply, but its rows must still be written
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    @pl.when(slot >= 0)
    def _():
        def body(c, acc):
            x = lhs_ref[:, pl.ds(c * block_k, block_k)]
            if transpose_rhs:
                return acc + dot(x, rhs_ref[slot, :, pl.ds(c * block_k, block_k)], trans_b=True)
            return acc + dot(x, rhs_ref[slot, pl.ds(c * block_k, block_k), :])

        acc = lax.fori_loop(0, k_dim // block_k, body,
                            jnp.zeros(out_ref.shape, jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, tile_slot: jax.Array, *, transpose_rhs: bool = False,
        out_dtype=None, block_k: int = 128, block_n: int = 128, interpret: bool = False,
        num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
    """Grouped matmul over tiles: row block ``u`` of ``lhs [NT*tile, K]`` times
    ``rhs[tile_slot[u]]`` (``rhs [N, K, M]``, or ``[N, M, K]`` with ``transpose_rhs``);
    rows of tiles with slot -1 are zero. ``K`` and ``M`` must be multiples of 16 (the
    caller pads). Returns ``[NT*tile, M]``."""
    rows, k_dim = lhs.shape
    nt = tile_slot.shape[0]
    tile = rows // nt
    m_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bk, k_pad = _fit(k_dim, block_k)
    bn, m_pad = _fit(m_dim, block_n)
    if (k_pad, m_pad) != (k_dim, m_dim):
        raise ValueError(f"gmm needs K ({k_dim}) and M ({m_dim}) padded to 16s")
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((rhs.shape[0], bn, k_dim), lambda u, n: (0, n, 0))
    else:
        rhs_spec = pl.BlockSpec((rhs.shape[0], k_dim, bn), lambda u, n: (0, 0, n))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, block_k=bk, transpose_rhs=transpose_rhs),
        grid=(nt, m_dim // bn),
        in_specs=[pl.BlockSpec((1,), lambda u, n: (u,)),
                  pl.BlockSpec((tile, k_dim), lambda u, n: (u, 0)),
                  rhs_spec],
        out_specs=pl.BlockSpec((tile, bn), lambda u, n: (u, n)),
        out_shape=jax.ShapeDtypeStruct((rows, m_dim), out_dtype or lhs.dtype),
        interpret=interpret,
        name="lora_gmm",
        **compiler_params_kwargs(interpret, num_warps, num_stages),
    )(tile_slot, lhs, rhs)


def _gmm_t_kernel(start_ref, count_ref, lhs_ref, rhs_ref, out_ref, *, tile: int):
    """One slot x one output block: the sum over the slot's tiles of ``lhs^T @ rhs``."""
    start = start_ref[0]

    def body(u, acc):
        rows = pl.ds((start + u) * tile, tile)
        return acc + dot(lhs_ref[rows, :], rhs_ref[rows, :], trans_a=True)

    # A slot with no tokens runs no step and writes zeros: its gradient is zero.
    acc = lax.fori_loop(0, count_ref[0], body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm_t(lhs: jax.Array, rhs: jax.Array, groups: TokenGroups, *, out_dtype=None,
          block_k: int = 128, block_m: int = 128, interpret: bool = False,
          num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
    """Grouped transpose product: ``out[n] = sum over slot n's rows of lhs^T @ rhs``
    for ``lhs [NT*tile, K]``, ``rhs [NT*tile, M]``. Returns ``[N, K, M]``."""
    rows, k_dim = lhs.shape
    m_dim = rhs.shape[1]
    num_slots = groups.group_tile_start.shape[0]
    tile = groups.tile
    bk, k_pad = _fit(k_dim, block_k)
    bm, m_pad = _fit(m_dim, block_m)
    if (k_pad, m_pad) != (k_dim, m_dim):
        raise ValueError(f"gmm_t needs K ({k_dim}) and M ({m_dim}) padded to 16s")
    return pl.pallas_call(
        functools.partial(_gmm_t_kernel, tile=tile),
        grid=(num_slots, k_dim // bk, m_dim // bm),
        in_specs=[pl.BlockSpec((1,), lambda n, i, j: (n,)),
                  pl.BlockSpec((1,), lambda n, i, j: (n,)),
                  pl.BlockSpec((rows, bk), lambda n, i, j: (0, i)),
                  pl.BlockSpec((rows, bm), lambda n, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, bk, bm), lambda n, i, j: (n, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_slots, k_dim, m_dim), out_dtype or lhs.dtype),
        interpret=interpret,
        name="lora_gmm_t",
        **compiler_params_kwargs(interpret, num_warps, num_stages),
    )(groups.group_tile_start, groups.group_tile_count, lhs, rhs)


@dataclasses.dataclass(frozen=True)
class LoraKernelConfig:
    """Static settings of the grouped LoRA kernels (a custom_vjp nondiff argument)."""

    block_k: int = 128
    block_n: int = 128
    interpret: bool = False
    num_warps: int | None = None
    num_stages: int | None = None

    def gmm(self, lhs, rhs, tile_slot, **kw):
        return gmm(lhs, rhs, tile_slot, block_k=self.block_k, block_n=self.block_n,
                   interpret=self.interpret, num_warps=self.num_warps,
                   num_stages=self.num_stages, **kw)

    def gmm_t(self, lhs, rhs, groups, **kw):
        return gmm_t(lhs, rhs, groups, block_k=self.block_k, block_m=self.block_n,
                     interpret=self.interpret, num_warps=self.num_warps,
                     num_stages=self.num_stages, **kw)


def _row_scale(scale: jax.Array, groups: TokenGroups) -> jax.Array:
    """``[NT*tile, 1]`` float32: each row's slot scale (0 for rows of unused tiles)."""
    row_slot = groups.row_slot
    return jnp.where(row_slot >= 0, jnp.take(scale, row_slot, mode="clip"), 0.0)[:, None]


def _lora_forward(cfg: LoraKernelConfig, x, a, b, scale, groups: TokenGroups):
    xs = jnp.take(x, groups.src, axis=0, mode="fill", fill_value=0)  # [rows, in]
    h = cfg.gmm(xs, a, groups.tile_slot, out_dtype=jnp.float32)  # [rows, R]
    hs = (h * _row_scale(scale.astype(jnp.float32), groups)).astype(x.dtype)
    ys = cfg.gmm(hs, b, groups.tile_slot, out_dtype=x.dtype)  # [rows, out]
    y = jnp.take(ys, groups.dest, axis=0, mode="fill", fill_value=0)
    return y, (xs, h, hs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_grouped(cfg: LoraKernelConfig, x, a, b, scale, groups: TokenGroups):
    return _lora_forward(cfg, x, a, b, scale, groups)[0]


def _lora_grouped_fwd(cfg, x, a, b, scale, groups):
    y, (xs, h, hs) = _lora_forward(cfg, x, a, b, scale, groups)
    # The grouped input and the [rows, R] shrink output are all that is kept.
    return y, (xs, h, hs, a, b, scale, groups)


def _lora_grouped_bwd(cfg, res, dy):
    xs, h, hs, a, b, scale, groups = res
    dys = jnp.take(dy, groups.src, axis=0, mode="fill", fill_value=0)  # [rows, out]
    dh = cfg.gmm(dys, b, groups.tile_slot, transpose_rhs=True, out_dtype=jnp.float32)
    row_slot = groups.row_slot
    # d scale[n] = sum over slot n's rows of <x a, dy b^T>; padded rows are zero.
    dscale = jax.ops.segment_sum(jnp.sum(h * dh, axis=1), jnp.where(row_slot >= 0, row_slot,
                                 scale.shape[0]), num_segments=scale.shape[0])
    dhs = (dh * _row_scale(scale.astype(jnp.float32), groups)).astype(xs.dtype)
    dxs = cfg.gmm(dhs, a, groups.tile_slot, transpose_rhs=True, out_dtype=xs.dtype)
    dx = jnp.take(dxs, groups.dest, axis=0, mode="fill", fill_value=0)
    da = cfg.gmm_t(xs, dhs, groups, out_dtype=a.dtype)  # [N, in, R]
    db = cfg.gmm_t(hs, dys, groups, out_dtype=b.dtype)  # [N, R, out]
    return dx, da, db, dscale.astype(scale.dtype), None


_lora_grouped.defvjp(_lora_grouped_fwd, _lora_grouped_bwd)


def lora_grouped(
    x: jax.Array,  # [T, in]
    a: jax.Array,  # [N, in, R]
    b: jax.Array,  # [N, R, out]
    scale: jax.Array,  # [N] float32
    groups: TokenGroups,
    *,
    block_k: int = 128,
    block_n: int = 128,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Multi-slot LoRA ``[T, out]`` over tokens grouped by ``group_tokens``; differentiable
    in ``x``, ``a``, ``b`` and ``scale`` (grouped backward kernels)."""
    tile = groups.tile
    if not interpret and (tile < MIN_TILE or not is_power_of_2(tile)):
        raise ValueError(f"compiled kernels need a power-of-two tile >= {MIN_TILE} "
                         f"(Triton matmul sides), got {tile}")
    rank = a.shape[-1]
    padded_rank = round_up(rank, RANK_MULTIPLE)
    a = a.astype(x.dtype)
    b = b.astype(x.dtype)
    if padded_rank != rank:  # zero rank columns add nothing; slice their gradient off
        a = jnp.pad(a, ((0, 0), (0, 0), (0, padded_rank - rank)))
        b = jnp.pad(b, ((0, 0), (0, padded_rank - rank), (0, 0)))
    in_dim, out_dim = a.shape[1], b.shape[2]
    in_pad, out_pad = _fit(in_dim, block_k)[1], _fit(out_dim, block_n)[1]
    if in_pad != in_dim:  # odd model widths only: zero columns of x and rows of A
        x = jnp.pad(x, ((0, 0), (0, in_pad - in_dim)))
        a = jnp.pad(a, ((0, 0), (0, in_pad - in_dim), (0, 0)))
    if out_pad != out_dim:
        b = jnp.pad(b, ((0, 0), (0, 0), (0, out_pad - out_dim)))
    cfg = LoraKernelConfig(block_k=block_k, block_n=block_n, interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages)
    y = _lora_grouped(cfg, x, a, b, scale, groups)
    return y[:, :out_dim]


def default_tile(num_tokens: int) -> int:
    """Rows per tile: 16 (Triton's minimum) unless the batch is big enough for the
    per-slot waste of a larger tile not to matter."""
    return 64 if num_tokens >= 1024 else 16


def lora_multi_slot(
    x: jax.Array,  # [T, in]
    a: jax.Array,  # [N, in, R]
    b: jax.Array,  # [N, R, out]
    scale: jax.Array,  # [N]
    slot_ids: jax.Array,  # [T]
    *,
    tile: int | None = None,
    interpret: bool = False,
    **kwargs,
) -> jax.Array:
    """Drop-in for ``lora_multi_slot_reference`` (groups the tokens on every call; use
    ``group_tokens`` once and ``lora_grouped`` per projection in a step)."""
    tile = default_tile(x.shape[0]) if tile is None else tile
    groups = group_tokens(slot_ids, a.shape[0], tile)
    return lora_grouped(x, a, b, scale, groups, interpret=interpret, **kwargs)


def lora_ragged_dot(
    x: jax.Array,  # [T, in]
    a: jax.Array,  # [N, in, R]
    b: jax.Array,  # [N, R, out]
    scale: jax.Array,  # [N]
    slot_ids: jax.Array,  # [T]
) -> jax.Array:
    """The same product through ``lax.ragged_dot`` (tokens sorted by slot, tokens without
    an adapter last and zeroed). On GPU, XLA lowers ragged_dot to a dense batched
    product over every slot, so this is a measured alternative, not the default."""
    num_slots = a.shape[0]
    slot_ids = slot_ids.astype(jnp.int32)
    key = jnp.where((slot_ids >= 0) & (slot_ids < num_slots), slot_ids, num_slots)
    perm = jnp.argsort(key, stable=True)
    sizes = jnp.zeros((num_slots + 1,), jnp.int32).at[key].add(1)[:num_slots]
    xs = x[perm]
    h = lax.ragged_dot(xs, a.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    sorted_key = key[perm]
    row_scale = jnp.where(sorted_key < num_slots,
                          jnp.take(scale.astype(jnp.float32), sorted_key, mode="clip"), 0.0)
    hs = (h * row_scale[:, None]).astype(x.dtype)
    ys = lax.ragged_dot(hs, b.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(ys).at[perm].set(ys).astype(x.dtype)
