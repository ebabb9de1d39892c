"""On-device sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.sampling import MAX_LOGPROBS, SamplingParams, sample_tokens, token_logprobs

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


def test_token_logprobs_are_the_raw_log_softmax():
    """The sampled token's logprob and the top MAX_LOGPROBS, against numpy, whatever the
    sampling settings were (vLLM's default: the model's raw distribution)."""
    logits = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32) * 3
    tokens = np.array([5, 0, 63, 17], np.int32)
    sampled, top, top_ids = jax.jit(token_logprobs)(jnp.asarray(logits), jnp.asarray(tokens))
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(sampled), ref[np.arange(4), tokens], atol=1e-5)
    order = np.argsort(-ref, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(top_ids), order)
    np.testing.assert_allclose(np.asarray(top), np.take_along_axis(ref, order, -1), atol=1e-5)


def test_logprobs_param_is_bounded():
    assert SamplingParams(logprobs=0).logprobs == 0
    for bad in (-1, MAX_LOGPROBS + 1, 1.5):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)
