"""Small helpers shared by the Pallas kernels (GPU/Triton-style, interpretable on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A finite "minus infinity" for masked scores: exp(MASK - m) underflows to 0 without the
# inf - inf = NaN that a true -inf gives when a whole row of a block is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


MIN_TILE = 16
"""Smallest side of a matmul the Triton lowering accepts (tensor-core tiles)."""


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with float32 accumulation, as ``lax.dot_general`` so the Triton lowering
    maps the transposes onto its own ``tt.trans`` instead of materialising them."""
    contract_a = 0 if trans_a else 1
    contract_b = 1 if trans_b else 0
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def gpu_compiler_params(num_warps: int | None = None, num_stages: int | None = None):
    """Triton compiler params (the class was renamed across releases), or None where this
    jax has no Triton backend.

    Always passed, even with no setting: the params' type is what selects the Triton
    backend; without them jax >= 0.10 lowers a GPU pallas_call with Mosaic GPU, which
    these kernels are not written for (whole-array blocks would be copied to SMEM).
    """
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover - jax without the Triton backend
        return None
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:  # pragma: no cover
        return None
    return cls(num_warps=num_warps, num_stages=num_stages)


def compiler_params_kwargs(interpret: bool, num_warps: int | None,
                           num_stages: int | None) -> dict:
    """``compiler_params=`` for a GPU pallas_call (Triton); nothing in interpret mode,
    where the CPU interpreter has no use for them."""
    if interpret:
        return {}
    params = gpu_compiler_params(num_warps, num_stages)
    return {} if params is None else {"compiler_params": params}


def online_softmax_step(acc: jax.Array, m: jax.Array, l: jax.Array, s: jax.Array,
                        visible: jax.Array, v: jax.Array):
    """One key block of flash attention's online softmax.

    ``acc [rows, Dh]``, running max ``m [rows]`` and normaliser ``l [rows]`` absorb the
    scores ``s [rows, block]`` (``visible`` masks them) against values ``v [block, Dh]``.
    Masked entries are zeroed explicitly so a row that has seen no visible key yet
    (``m == MASK_VALUE``) does not count ``exp(0) = 1`` for each masked one.
    """
    s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l
