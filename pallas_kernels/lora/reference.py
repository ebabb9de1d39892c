"""Plain-jnp multi-adapter LoRA: the definition every kernel is held against.

Each token names an adapter slot (or -1 for none). The reference applies every
slot's shrink to every token and masks with a one-hot of the token's slot: N
times the LoRA work, which is small beside the base projection since r << d,
and free of per-token gathers of A and B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_multi_slot_reference(
    x: jax.Array,  # [T, in]
    a: jax.Array,  # [N, in, R]
    b: jax.Array,  # [N, R, out]
    scale: jax.Array,  # [N] float32: alpha/r of each slot (0 for an empty slot)
    slot_ids: jax.Array,  # [T] int32: the token's slot, -1 for none
) -> jax.Array:
    """``(x @ a[s] @ b[s]) * scale[s]`` for each token's slot ``s``; zero for -1. ``[T, out]``."""
    num_slots = a.shape[0]
    weight = (slot_ids[:, None] == jnp.arange(num_slots)[None, :]) * scale[None, :]  # [T, N]
    xa = jnp.einsum("ti,nir->tnr", x, a.astype(x.dtype))
    xa = xa * weight[..., None].astype(x.dtype)
    return jnp.einsum("tnr,nro->to", xa, b.astype(x.dtype))


def lora_single_reference(
    x: jax.Array,  # [..., in]
    a: jax.Array,  # [in, R]
    b: jax.Array,  # [R, out]
    scale: jax.Array | float,
) -> jax.Array:
    """One adapter for every token: ``(x @ a @ b) * scale`` ``[..., out]``."""
    return ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
