"""The dense causal flash attention pair (custom_vjp) against its jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util as jax_test_util
import numpy as np
import pytest
from kernel_cases import assert_close

from pallas_kernels.ragged_paged_attention import (
    dense_causal_attention_reference,
    flash_causal_attention,
)

# (batch, length, query heads per kv head, kv heads, head_dim, block_q, block_k):
# GQA 1/4/8, head sizes 64/128, lengths that do and do not fill the blocks.
CASES = [
    (2, 24, 1, 2, 64, 8, 8),
    (1, 20, 4, 2, 128, 4, 8),
    (1, 16, 8, 1, 64, 2, 4),
]


def _inputs(seed, b, length, g, hkv, dh):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, length, hkv * g, dh), np.float32))
    k = jnp.asarray(rng.standard_normal((b, length, hkv, dh), np.float32))
    v = jnp.asarray(rng.standard_normal((b, length, hkv, dh), np.float32))
    w = jnp.asarray(rng.standard_normal(q.shape, np.float32))  # a random cotangent
    return q, k, v, w


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_reference(case):
    b, length, g, hkv, dh, bq, bk = CASES[case]
    q, k, v, w = _inputs(case, b, length, g, hkv, dh)

    def flash(q, k, v):
        return flash_causal_attention(q, k, v, block_q=bq, block_k=bk, interpret=True)

    def forward_and_grads(fn):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(w)

    out, grads = jax.jit(forward_and_grads, static_argnums=0)(flash)
    ref, ref_grads = forward_and_grads(dense_causal_attention_reference)
    assert_close(out, ref)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(got, want, tol=1e-5, what=name)


def test_check_grads_reverse_mode():
    """Numerical reverse-mode check of the custom_vjp (default blocks, one padded block)."""
    q, k, v, _ = _inputs(9, 1, 12, 2, 1, 64)
    fn = jax.jit(lambda q, k, v: flash_causal_attention(q, k, v, interpret=True))
    jax_test_util.check_grads(fn, (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_backward_saves_no_probabilities():
    """The residuals of the custom_vjp are O(L) per head (inputs, output, logsumexp),
    never the [L, L] probabilities, which here would be 4x the size of q."""
    q, k, v, _ = _inputs(1, 1, 64, 1, 1, 16)
    _, pullback = jax.vjp(
        lambda q, k, v: flash_causal_attention(q, k, v, block_q=16, block_k=16,
                                               interpret=True), q, k, v)
    sizes = [x.size for x in jax.tree.leaves(pullback)]
    assert sizes and max(sizes) <= q.size
