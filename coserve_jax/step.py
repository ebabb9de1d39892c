"""The co-serving step: the one place where the model step is jitted and buffers donated.

JIT rules: the step is a pure function of arrays; every Python-level choice
(model config, attention implementation, whether logits are returned) is fixed
when the step is built, and array shapes come only from the batch bucket, so
steady state never recompiles.
"""

from __future__ import annotations

import functools
import os

import flax.struct
import jax

from coserve_jax.batch import TokenBatch
from coserve_jax.config import ModelConfig
from coserve_jax.kv_cache import KVCache
from coserve_jax.models import llama
from coserve_jax.sampling import sample_tokens
from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    write_kv_pages,
)


@flax.struct.dataclass
class StepOutput:
    """What one step returns to the host."""

    next_tokens: jax.Array  # [S] int32: sampled token of each sequence's logits token
    logits: jax.Array | None = None  # [S, V] float32, only when built with return_logits


def step_fn(cfg: ModelConfig, params, kv: KVCache, batch: TokenBatch, *, return_logits: bool):
    """The un-jitted step: forward the batch, write KV, sample each sequence's next token."""
    hidden, kv = llama.forward_paged(
        cfg, params, kv, batch, ragged_paged_attention_reference, write_kv_pages
    )
    logits = llama.lm_head(params, hidden[batch.logits_indices])
    next_tokens = sample_tokens(logits, batch.temperature, batch.top_k, batch.top_p,
                                batch.seeds, batch.sample_counts)
    return kv, StepOutput(next_tokens=next_tokens, logits=logits if return_logits else None)


def build_step(cfg: ModelConfig, return_logits: bool = False):
    """``step(params, kv, batch) -> (kv, StepOutput)``, jitted, with ``kv`` donated."""
    fn = functools.partial(step_fn, cfg, return_logits=return_logits)
    return jax.jit(fn, donate_argnums=(1,))


_cache_enabled = False


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (once per process); returns its directory."""
    global _cache_enabled
    path = path or os.environ.get("COSERVE_XLA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "coserve_jax", "xla"
    )
    if not _cache_enabled:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _cache_enabled = True
    return jax.config.jax_compilation_cache_dir
