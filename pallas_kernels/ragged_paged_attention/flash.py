"""Flash attention forward and backward for dense causal GQA self-attention (Pallas).

The finetuning backward pieces recompute each layer over one whole training sequence
``[B, L, H, Dh]`` and differentiate it; ``coserve_jax.models.llama`` does that with plain
(or query-blocked, rematerialised) attention whose backward holds ``[L, L]`` scores per
head or block. This pair keeps only the output and the per-row logsumexp from the
forward (``jax.custom_vjp``) and recomputes the probabilities tile by tile in the
backward, as FlashAttention-2 does:

- forward: grid ``(B, Hkv, L / block_q)``; each program holds ``block_q`` query tokens
  times the ``G`` query heads of one kv head (GQA: one K/V read serves the whole group)
  and scans the causal prefix of K/V ``block_k`` keys at a time with an online softmax;
- backward ``dq``: same grid; rescans the causal prefix with ``p = exp(s - lse)``;
- backward ``dk, dv``: grid ``(B, Hkv, L / block_k)``; each program holds one key block
  and scans the query blocks at or after it; since the rows of a query block are all
  ``G`` heads of the group, the sum over the group's heads falls out of the matmuls.

``delta = rowsum(o * do)`` is an elementwise jnp op that XLA fuses; it needs no kernel.
Sequence length is padded to the block size and the head group to a power of two with
zeros; causality keeps real rows away from padded keys and zero ``do`` rows give padded
rows no gradient, so the padding changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MASK_VALUE,
    MIN_TILE,
    compiler_params_kwargs,
    dot,
    is_power_of_2,
    next_power_of_2,
    online_softmax_step,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static settings of one flash attention call (hashable: a custom_vjp nondiff arg)."""

    scale: float
    block_q: int  # query tokens per program (rows = block_q * G)
    block_k: int  # keys per inner step
    interpret: bool = False
    num_warps: int | None = None
    num_stages: int | None = None


def default_flash_blocks(num_q_per_kv: int) -> tuple[int, int]:
    """(block_q, block_k): ~64 rows of grouped heads per program and 64 keys per step."""
    return max(1, 64 // next_power_of_2(num_q_per_kv)), 64


def _row_positions(first: jax.Array, block_q: int, groups: int) -> jax.Array:
    """Token position of each row ``[block_q * groups, 1]`` (rows are token-major)."""
    pos = first + jnp.arange(block_q, dtype=jnp.int32)
    return jnp.broadcast_to(pos[:, None], (block_q, groups)).reshape(block_q * groups, 1)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, block_k: int):
    block_q, groups, head_dim = q_ref.shape
    rows = block_q * groups
    i = pl.program_id(2)
    q = q_ref[...].reshape(rows, head_dim)
    q_pos = _row_positions(i * block_q, block_q, groups)

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = dot(q, k, trans_b=True) * scale
        visible = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :] <= q_pos
        return online_softmax_step(acc, m, l, s, visible, v)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    # Only the causal prefix: keys up to the block's last query.
    num_steps = pl.cdiv((i + 1) * block_q, block_k)
    acc, m, l = lax.fori_loop(0, num_steps, body, init)
    o_ref[...] = (acc / l[:, None]).reshape(block_q, groups, head_dim).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log(l)).reshape(block_q, groups)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float,
               block_k: int):
    block_q, groups, head_dim = q_ref.shape
    rows = block_q * groups
    i = pl.program_id(2)
    q = q_ref[...].reshape(rows, head_dim)
    do = do_ref[...].reshape(rows, head_dim)
    lse = lse_ref[...].reshape(rows, 1)
    delta = delta_ref[...].reshape(rows, 1)
    q_pos = _row_positions(i * block_q, block_q, groups)

    def body(j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = dot(q, k, trans_b=True) * scale
        visible = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :] <= q_pos
        p = jnp.where(visible, jnp.exp(s - lse), 0.0)
        dp = dot(do, v, trans_b=True)
        ds = p * (dp - delta)
        return dq + dot(ds.astype(k.dtype), k)

    num_steps = pl.cdiv((i + 1) * block_q, block_k)
    dq = lax.fori_loop(0, num_steps, body, jnp.zeros((rows, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).reshape(block_q, groups, head_dim).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale: float, block_q: int):
    length, groups, head_dim = q_ref.shape
    block_k = k_ref.shape[0]
    rows = block_q * groups
    j = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    key_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def body(i, carry):
        dk, dv = carry
        q = q_ref[pl.ds(i * block_q, block_q)].reshape(rows, head_dim)
        do = do_ref[pl.ds(i * block_q, block_q)].reshape(rows, head_dim)
        lse = lse_ref[pl.ds(i * block_q, block_q)].reshape(rows, 1)
        delta = delta_ref[pl.ds(i * block_q, block_q)].reshape(rows, 1)
        s = dot(q, k, trans_b=True) * scale  # [rows, block_k]
        visible = key_pos <= _row_positions(i * block_q, block_q, groups)
        p = jnp.where(visible, jnp.exp(s - lse), 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        dp = dot(do, v, trans_b=True)
        ds = p * (dp - delta)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    # Query blocks that can see this key block: from the one holding its first key on.
    first = (j * block_k) // block_q
    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(first, length // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _q_spec(block_q: int, groups: int, head_dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, block_q, None, groups, head_dim), lambda b, h, i: (b, i, h, 0, 0))


def _row_spec(block_q: int, groups: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, block_q, None, groups), lambda b, h, i: (b, i, h, 0))


def _forward(cfg: FlashConfig, q, k, v):
    """q ``[B, Lp, Hkv, Gp, Dh]``, k/v ``[B, Lp, Hkv, Dh]`` -> (o like q, lse
    ``[B, Lp, Hkv, Gp]`` float32)."""
    b, length, hkv, groups, dh = q.shape
    whole_kv = pl.BlockSpec((None, length, None, dh), lambda b_, h, i: (b_, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, block_k=cfg.block_k),
        grid=(b, hkv, length // cfg.block_q),
        in_specs=[_q_spec(cfg.block_q, groups, dh), whole_kv, whole_kv],
        out_specs=[_q_spec(cfg.block_q, groups, dh), _row_spec(cfg.block_q, groups)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)],
        interpret=cfg.interpret,
        name="flash_causal_fwd",
        **compiler_params_kwargs(cfg.interpret, cfg.num_warps, cfg.num_stages),
    )(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: FlashConfig, q, k, v):
    return _forward(cfg, q, k, v)[0]


def _flash_fwd(cfg: FlashConfig, q, k, v):
    o, lse = _forward(cfg, q, k, v)
    # Residuals: inputs, output and one float per row; never the [L, L] probabilities.
    return o, (q, k, v, o, lse)


def _flash_bwd(cfg: FlashConfig, res, do):
    q, k, v, o, lse = res
    b, length, hkv, groups, dh = q.shape
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    do = do.astype(q.dtype)
    params = compiler_params_kwargs(cfg.interpret, cfg.num_warps, cfg.num_stages)
    whole_kv = pl.BlockSpec((None, length, None, dh), lambda b_, h, i: (b_, 0, h, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, block_k=cfg.block_k),
        grid=(b, hkv, length // cfg.block_q),
        in_specs=[_q_spec(cfg.block_q, groups, dh), whole_kv, whole_kv,
                  _q_spec(cfg.block_q, groups, dh), _row_spec(cfg.block_q, groups),
                  _row_spec(cfg.block_q, groups)],
        out_specs=_q_spec(cfg.block_q, groups, dh),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret,
        name="flash_causal_bwd_dq",
        **params,
    )(q, k, v, do, lse, delta)
    kv_block = pl.BlockSpec((None, cfg.block_k, None, dh), lambda b_, h, j: (b_, j, h, 0))
    whole_q = pl.BlockSpec((None, length, None, groups, dh), lambda b_, h, j: (b_, 0, h, 0, 0))
    whole_rows = pl.BlockSpec((None, length, None, groups), lambda b_, h, j: (b_, 0, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, block_q=cfg.block_q),
        grid=(b, hkv, length // cfg.block_k),
        in_specs=[whole_q, kv_block, kv_block, whole_q, whole_rows, whole_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret,
        name="flash_causal_bwd_dkv",
        **params,
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_supports(head_dim: int) -> bool:
    """Whether the Triton tiles can be formed (power-of-two head size)."""
    return is_power_of_2(head_dim)


def flash_causal_attention(
    q: jax.Array,  # [B, L, Hq, Dh]
    k: jax.Array,  # [B, L, Hkv, Dh]
    v: jax.Array,  # [B, L, Hkv, Dh]
    scale: float | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Causal GQA self-attention ``[B, L, Hq, Dh]``, differentiable (flash backward).

    Same result as ``dense_causal_attention_reference``. ``block_q`` counts query tokens
    per program (its rows are ``block_q`` times the head group), ``block_k`` keys per step;
    both powers of two. Any ``L`` works (padded up to the blocks). Compiled (not
    interpret) blocks are raised to Triton's minimum matmul side of 16.
    """
    b, length, hq, dh = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not flash_supports(dh):
        raise ValueError(f"the kernel needs a power-of-two head_dim, got {dh}")
    groups = hq // hkv
    gp = next_power_of_2(groups)
    dq_default, dk_default = default_flash_blocks(groups)
    block_q = dq_default if block_q is None else block_q
    block_k = dk_default if block_k is None else block_k
    if not (is_power_of_2(block_q) and is_power_of_2(block_k)):
        raise ValueError(f"block_q ({block_q}) and block_k ({block_k}) must be powers of two")
    # Blocks no longer than the (power-of-two rounded) sequence, so short ones pad little...
    block_q = min(block_q, next_power_of_2(length))
    block_k = min(block_k, next_power_of_2(length))
    if not interpret:  # ...but Triton's matmuls need every side >= 16 (rows are block_q * G)
        block_q = max(block_q, MIN_TILE // gp)
        block_k = max(block_k, MIN_TILE)
    padded = round_up(length, max(block_q, block_k))
    cfg = FlashConfig(scale=float(1.0 / np.sqrt(dh)) if scale is None else float(scale),
                      block_q=block_q, block_k=block_k, interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)
    qg = q.reshape(b, length, hkv, groups, dh)
    qg = jnp.pad(qg, ((0, 0), (0, padded - length), (0, 0), (0, gp - groups), (0, 0)))
    pad_kv = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    out = _flash(cfg, qg, jnp.pad(k, pad_kv), jnp.pad(v, pad_kv))
    return out[:, :length, :, :groups].reshape(b, length, hq, dh)
