"""Sampling parameters (validated on the host) and sampling on the device."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from coserve_jax.errors import InvalidRequest

MAX_SEED = 2**31 - 1
MAX_LOGPROBS = 20
"""Top logprobs the step returns per sampled token (OpenAI's ``top_logprobs`` allows 20)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Invalid values raise ``ValueError`` at construction."""

    max_tokens: int = 16
    """New tokens to generate at most."""
    temperature: float = 0.0
    """0 is greedy; higher flattens the distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1 keeps all."""
    seed: int | None = None
    """Seed of this request's random stream; the same seed gives the same tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the generation (kept in the output), besides the model's EOS."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens."""
    logprobs: int | None = None
    """With a number n in [0, MAX_LOGPROBS], each output token comes with its logprob and
    the n most likely tokens' logprobs (of the model's raw distribution); None: neither."""

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, lo=0)
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidRequest(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")


def sample_tokens(
    logits: jax.Array,  # [S, V] float32
    temperature: jax.Array,  # [S] float32
    top_k: jax.Array,  # [S] int32
    top_p: jax.Array,  # [S] float32
    seeds: jax.Array,  # [S] int32
    sample_counts: jax.Array,  # [S] int32
) -> jax.Array:
    """Next token per row ``[S]`` int32: greedy where temperature is 0, else sampled.

    Each row draws from ``fold_in(key(seed), sample_count)``, so a request's
    tokens depend only on its seed and position, never on what it is batched with.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # All-greedy batches (the common case) skip the vocabulary sort entirely.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jnp.where(temperature > 0, _sample(logits, temperature, top_k, top_p, seeds,
                                                   sample_counts), greedy),
        lambda: greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array,
                   k: int = MAX_LOGPROBS) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logprobs of the model's raw distribution (before temperature, top-k and top-p, as
    vLLM reports them by default) for each row's sampled token ``[S]`` and its ``k`` most
    likely tokens: ``(sampled [S], top [S, k], top_ids [S, k] int32)``."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logprobs, min(k, logits.shape[-1]))
    return sampled, top, top_ids.astype(jnp.int32)


def _sample(logits, temperature, top_k, top_p, seeds, sample_counts) -> jax.Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    # top-k: the k-th largest logit is the cut-off (k = 0 keeps everything).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    # top-p on what top-k kept: keep tokens whose preceding cumulative mass is below p.
    ranks = jnp.arange(vocab)[None, :]
    kept_sorted = jnp.where(ranks < k[:, None], sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(kept_sorted, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p[:, None]) & (ranks < k[:, None])
    last_kept = jnp.sum(keep_sorted, axis=-1) - 1
    cutoff = jnp.maximum(jnp.take_along_axis(sorted_logits, last_kept[:, None], axis=-1), kth)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)

    def draw(seed, count, row):
        key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), count)
        return jax.random.categorical(key, row)

    return jax.vmap(draw)(seeds, sample_counts, masked).astype(jnp.int32)
