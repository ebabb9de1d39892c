"""Grouped multi-LoRA kernels (forward and dx, dA, dB) against the jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util as jax_test_util
import numpy as np
import pytest
from kernel_cases import assert_close, lora_inputs

from pallas_kernels.lora import (
    group_tokens,
    lora_grouped,
    lora_multi_slot,
    lora_multi_slot_reference,
    lora_ragged_dot,
)
from pallas_kernels.lora.kernel import max_tiles

# Adapter mixes (slot of each token; -1: no adapter) over 4 slots.
MIXES = {
    # decode: one or two tokens per adapter, many without; slot 3 unused
    "decode": [2, -1, 0, 2, -1, 1, -1, -1, 0, 2, -1, 1],
    # prefill chunks and finetuning windows: long runs of one slot, plus base-model tokens
    "prefill": [1] * 19 + [-1] * 6 + [3] * 9 + [0] * 17 + [-1] * 3,
    # no token uses an adapter: everything is zero
    "none": [-1] * 10,
}
# (mix, rank, in, out, tile)
CASES = [
    ("decode", 8, 64, 48, 16),
    ("prefill", 64, 32, 64, 16),
    ("prefill", 16, 48, 32, 32),
    ("none", 32, 32, 32, 16),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_reference(case):
    mix, rank, din, dout, tile = CASES[case]
    rng = np.random.default_rng(100 + case)
    x, a, b, scale, slots = lora_inputs(rng, MIXES[mix], num_slots=4, in_dim=din,
                                        out_dim=dout, rank=rank)
    w = jnp.asarray(rng.standard_normal((x.shape[0], dout), np.float32))

    def kernel(x, a, b, scale):
        return lora_grouped(x, a, b, scale, group_tokens(slots, 4, tile), interpret=True)

    def reference(x, a, b, scale):
        return lora_multi_slot_reference(x, a, b, scale, slots)

    def forward_and_grads(fn):
        out, pullback = jax.vjp(fn, x, a, b, scale)
        return out, pullback(w)

    out, grads = jax.jit(forward_and_grads, static_argnums=0)(kernel)
    ref, ref_grads = forward_and_grads(reference)
    if mix == "none":
        assert not np.any(np.asarray(out)) and not np.any(np.asarray(grads[1]))
        return
    assert_close(out, ref)
    for name, got, want in zip(("dx", "dA", "dB", "dscale"), grads, ref_grads, strict=True):
        assert_close(got, want, what=name)
    unused = [s for s in range(4) if s not in MIXES[mix]]
    for s in unused:  # written, and zero: a slot without tokens gets no gradient
        assert not np.any(np.asarray(grads[1][s])) and not np.any(np.asarray(grads[2][s]))


def test_check_grads_reverse_mode():
    rng = np.random.default_rng(1)
    x, a, b, scale, slots = lora_inputs(rng, MIXES["decode"], num_slots=4, in_dim=16,
                                        out_dim=16, rank=8)
    fn = jax.jit(lambda x, a, b: lora_multi_slot(x, a, b, scale, slots, interpret=True))
    jax_test_util.check_grads(fn, (x, a, b), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("tile", [1, 4, 16])
def test_group_tokens_layout(mix, tile):
    """Tokens of one slot share tiles, tokens without an adapter get no row, and the
    fixed tile count suffices."""
    slots = np.asarray(MIXES[mix], np.int32)
    t, n = slots.size, 4
    g = jax.tree.map(np.asarray, group_tokens(jnp.asarray(slots), n, tile))
    assert g.tile_slot.shape == (max_tiles(t, n, tile),)
    np.testing.assert_array_equal(g.group_sizes, [np.sum(slots == s) for s in range(n)])
    np.testing.assert_array_equal(g.group_tile_count, -(-g.group_sizes // tile))
    real = slots >= 0
    rows = g.src.size
    assert np.all(g.dest[~real] == rows) and np.all(g.dest[real] < rows)
    assert len(set(g.dest[real].tolist())) == real.sum()
    np.testing.assert_array_equal(g.src[g.dest[real]], np.nonzero(real)[0])
    for tok in np.nonzero(real)[0]:
        assert g.tile_slot[g.dest[tok] // tile] == slots[tok]
    for s in range(n):
        tiles = g.tile_slot[g.group_tile_start[s]:g.group_tile_start[s] + g.group_tile_count[s]]
        assert np.all(tiles == s)
    assert np.sum(g.tile_slot >= 0) == g.group_tile_count.sum()  # unused tiles are -1
    assert sorted(g.perm.tolist()) == list(range(t))


def test_ragged_dot_alternative_matches_reference():
    """``lax.ragged_dot`` gives the same product (on GPU XLA pads it to a dense batch)."""
    rng = np.random.default_rng(2)
    x, a, b, scale, slots = lora_inputs(rng, MIXES["prefill"], num_slots=4, in_dim=32,
                                        out_dim=24, rank=8)
    assert_close(jax.jit(lora_ragged_dot)(x, a, b, scale, slots),
                 lora_multi_slot_reference(x, a, b, scale, slots))
