"""Chunked prefill and decode through paged KV give the logits of the whole-sequence forward."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import coserve_jax
from coserve_jax.batch import Bucket, SeqChunk, build_batch
from coserve_jax.kv_cache import KVCache, PageAllocator
from coserve_jax.models import llama
from pallas_kernels import select_kernels
from pallas_kernels.ragged_paged_attention import write_kv_pages

from support import relative_error, tiny_model

MAX_PAGES = 32
NUM_SEQS = 4


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _paged_logits(cfg, params, kv, batch):
    # The reference path's PagedAttentionFn (the plain jnp attention, taking ``layer=``).
    attention = select_kernels("reference").paged_attention
    x, kv, _ = llama.forward_paged(cfg, params, kv, batch, attention, write_kv_pages)
    return llama.lm_head(params, llama.final_norm(cfg, params, x)), kv


def _random_plan(rng: np.random.Generator, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Steps of (sequence, tokens) chunks: random subsets, chunk sizes from 1 (decode) up."""
    done = [0] * len(lengths)
    plan = []
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        live = [i for i, (d, n) in enumerate(zip(done, lengths, strict=True)) if d < n]
        picked = rng.choice(live, size=rng.integers(1, len(live) + 1), replace=False)
        step = []
        for i in sorted(picked):
            n = int(min(rng.choice([1, 1, 2, 3, 5, 8, 13]), lengths[i] - done[i]))
            step.append((int(i), n))
            done[i] += n
        plan.append(step)
    return plan


def run_paged(model, seqs: list[list[int]], plan, page_size: int, num_pages: int):
    """Runs the plan through paged KV; returns per-sequence logits [len, V] of every token."""
    cfg = model.config
    kv = KVCache.zeros(cfg, num_pages, page_size, model.dtype)
    alloc = PageAllocator(num_pages, page_size, MAX_PAGES)
    done = [0] * len(seqs)
    out = [np.zeros((len(s), cfg.vocab_size), np.float32) for s in seqs]
    # Shuffle physical pages so page tables are not the identity.
    alloc._free = list(np.random.default_rng(0).permutation(num_pages))
    for step in plan:
        chunks, spans = [], []
        for i, n in step:
            table = alloc.grow(i, done[i] + n)
            chunks.append(SeqChunk(seqs[i][done[i]:done[i] + n], done[i], list(table)))
            spans.append((i, done[i], n))
            done[i] += n
        total = sum(n for _, n in step)
        bucket = Bucket(num_tokens=max(8, 1 << (total - 1).bit_length()), num_seqs=NUM_SEQS,
                        num_pages=MAX_PAGES)
        batch = build_batch(chunks, bucket, page_size)
        logits, kv = _paged_logits(cfg, model.params, kv, batch)
        logits = np.asarray(logits)
        cursor = 0
        for i, start, n in spans:
            out[i][start:start + n] = logits[cursor:cursor + n]
            cursor += n
    return out


@pytest.mark.parametrize("page_size,seed", [(4, 0), (8, 1), (16, 2), (5, 3)])
def test_paged_chunks_equal_whole_sequence(page_size, seed):
    model = tiny_model()
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 40, size=NUM_SEQS)]
    seqs = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in lengths]
    plan = _random_plan(rng, lengths)
    assert any(n > 1 for step in plan for _, n in step)  # prefill chunks
    assert any(n == 1 for step in plan for _, n in step)  # decode-sized chunks
    got = run_paged(model, seqs, plan, page_size, num_pages=64)
    for seq, logits in zip(seqs, got, strict=True):
        ref = coserve_jax.forward_logits(model, [seq])[0]
        assert relative_error(logits, ref) < 1e-5
