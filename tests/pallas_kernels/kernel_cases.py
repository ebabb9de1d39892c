"""Random inputs for the kernel tests: ragged paged batches and multi-adapter token mixes."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention.reference import combine_kv


def rel_err(out, ref) -> float:
    """Max abs error relative to the reference's max magnitude."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


OBSERVED: list[tuple[str, str, float]] = []
"""(test, what, relative error) of every comparison, for the summary conftest.py prints."""


def assert_close(out, ref, tol: float = 1e-5, what: str = "output") -> float:
    """Every element finite (the interpreter leaves unwritten outputs NaN) and within tol."""
    out = np.asarray(out)
    assert out.shape == np.asarray(ref).shape, (out.shape, np.asarray(ref).shape)
    assert np.isfinite(out).all(), f"{what}: {np.sum(~np.isfinite(out))} non-finite elements"
    err = rel_err(out, ref)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    OBSERVED.append((test, what, err))
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"
    return err


@dataclasses.dataclass
class PagedBatch:
    q: jax.Array  # [T, Hq, Dh]
    kv_pages: jax.Array  # [P, page_size, 2 * Hkv, Dh]: K of head h at 2h, V at 2h + 1
    page_tables: jax.Array  # [S, W]
    seq_ids: jax.Array  # [T]
    positions: jax.Array  # [T]

    @property
    def args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.kv_pages, self.page_tables, self.seq_ids, self.positions)


# Ragged mixes: (chunk length, first position) per sequence. Decode rows are one token
# deep in a cached context, prefill chunks continue a prefix or start at 0, finetuning
# windows are whole sequences from position 0.
MIXES = {
    "decode": [(1, 9), (1, 0), (1, 30), (1, 17), (1, 4), (1, 23)],
    "prefill": [(13, 0), (9, 5)],
    "mixed": [(1, 9), (7, 3), (1, 30), (16, 0), (12, 0), (1, 0)],
}


def paged_batch(rng: np.random.Generator, mix: str, *, num_q_per_kv: int, num_kv_heads: int,
                head_dim: int, page_size: int, pad_tokens: int = 3, extra_seqs: int = 1,
                dtype=jnp.float32) -> PagedBatch:
    """A TokenBatch-shaped ragged batch (sequences contiguous, padding tokens last with
    sequence 0 at position 0) over random pages; every sequence owns distinct pages."""
    chunks = MIXES[mix]
    num_seqs = len(chunks) + extra_seqs  # padding rows of the page table too
    width = max(-(-(s + n) // page_size) for n, s in chunks) + 1
    num_pages = num_seqs * width + 3
    tables = rng.permutation(num_pages)[: num_seqs * width].reshape(num_seqs, width)
    seq_ids, positions = [], []
    for i, (n, start) in enumerate(chunks):
        seq_ids += [i] * n
        positions += list(range(start, start + n))
    seq_ids += [0] * pad_tokens
    positions += [0] * pad_tokens
    t, hkv = len(seq_ids), num_kv_heads
    hq = hkv * num_q_per_kv

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    return PagedBatch(
        q=normal(t, hq, head_dim),
        # Drawn as separate K and V (the same values as before the cache was combined).
        kv_pages=combine_kv(normal(num_pages, page_size, hkv, head_dim),
                            normal(num_pages, page_size, hkv, head_dim)),
        page_tables=jnp.asarray(tables, jnp.int32),
        seq_ids=jnp.asarray(seq_ids, jnp.int32),
        positions=jnp.asarray(positions, jnp.int32),
    )


def lora_inputs(rng: np.random.Generator, slot_ids, *, num_slots: int, in_dim: int,
                out_dim: int, rank: int, dtype=jnp.float32):
    """(x, a, b, scale, slot_ids) with random weights and per-slot scales."""
    slot_ids = np.asarray(slot_ids, np.int32)
    t = slot_ids.shape[0]
    x = jnp.asarray(rng.standard_normal((t, in_dim), np.float32), dtype)
    a = jnp.asarray(rng.standard_normal((num_slots, in_dim, rank), np.float32) / 4, dtype)
    b = jnp.asarray(rng.standard_normal((num_slots, rank, out_dim), np.float32) / 4, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, num_slots), jnp.float32)
    return x, a, b, scale, jnp.asarray(slot_ids)
