"""On-device sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.sampling import SamplingParams, sample_tokens

_sample = jax.jit(sample_tokens)


def _draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """n draws from one row of logits, one per sample count."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(_sample(
        rows, jnp.full(n, temperature, jnp.float32), jnp.full(n, top_k, jnp.int32),
        jnp.full(n, top_p, jnp.float32), jnp.full(n, seed, jnp.int32), jnp.arange(n)))


LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    got = np.asarray(_sample(jnp.asarray(logits), jnp.zeros(6), jnp.zeros(6, jnp.int32),
                             jnp.ones(6), jnp.arange(6), jnp.zeros(6, jnp.int32)))
    np.testing.assert_array_equal(got, logits.argmax(-1))


def test_temperature_one_follows_the_softmax():
    draws = _draw(LOGITS, 4000)
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    draws = _draw(LOGITS, 2000, top_k=2)
    assert set(np.unique(draws)) == {1, 3}
    freq = np.bincount(draws, minlength=5)[[1, 3]] / len(draws)
    np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7], atol=0.04)
    assert set(np.unique(_draw(LOGITS, 200, top_k=1))) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted probs 0.4, 0.3, 0.15, ...: p=0.6 needs the top two, p=0.75 the top three.
    assert set(np.unique(_draw(LOGITS, 2000, top_p=0.6))) == {1, 3}
    assert set(np.unique(_draw(LOGITS, 2000, top_p=0.75))) == {1, 3, 4}
    assert set(np.unique(_draw(LOGITS, 500, top_p=0.01))) == {1}


def test_same_seed_same_tokens_different_seed_different():
    a, b, c = _draw(LOGITS, 64, seed=5), _draw(LOGITS, 64, seed=5), _draw(LOGITS, 64, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("temperature", float("inf")), ("top_p", 1.5), ("top_p", -0.1),
    ("top_k", -2), ("top_k", 2.5), ("max_tokens", -1), ("seed", 2**31), ("seed", True),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
