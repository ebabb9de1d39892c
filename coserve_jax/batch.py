"""The token batch: the fixed-shape pytree that one co-serving step consumes.

Shapes come from a small set of buckets (``T`` tokens, ``S`` sequences, and
``W`` page-table columns, which bounds the context the reference attention
reads), so the step compiles once per bucket. Tokens of one sequence are contiguous and in
order. Padding tokens have ``token_mask == False``, write their K/V nowhere
(slot ``-1``) and attend only to position 0 of sequence 0, which keeps them
finite; padding sequences are ignored by the host.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class TokenBatch:
    """One step's tokens. All fields are int32/float32/bool arrays."""

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32: position of the token in its sequence
    seq_ids: jax.Array  # [T] int32: row of the token's sequence in the per-sequence arrays
    slots: jax.Array  # [T] int32: KV slot (page * page_size + offset); -1 for padding
    token_mask: jax.Array  # [T] bool: real tokens
    page_tables: jax.Array  # [S, W] int32: the first W pages of each sequence
    logits_indices: jax.Array  # [S] int32: token whose logits yield the sequence's next token
    temperature: jax.Array  # [S] float32: 0 means greedy
    top_k: jax.Array  # [S] int32: 0 disables
    top_p: jax.Array  # [S] float32: 1 disables
    seeds: jax.Array  # [S] int32: per-request sampling seed
    sample_counts: jax.Array  # [S] int32: tokens the request has sampled so far (RNG stream)
    adapter_slots: jax.Array  # [T] int32: LoRA slot of the token, -1 for the base model
    labels: jax.Array  # [T] int32: finetuning target of the token (next token); 0 if none
    loss_weights: jax.Array  # [T] float32: 1/targets-of-its-sequence for targets, else 0
    act_index: jax.Array  # [T] int32: row of the activation store to save to; -1 for none
    feed_rows: jax.Array  # [T] int32: row of the previous step's sampled tokens that is
    #   this token's id (a decode token planned before its id reached the host); -1: none

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.page_tables.shape[0]


# The TokenBatch fields with one entry per token (leading T axis); the rest are per sequence.
# A mesh layout splits these across its data axis (sharding.layout.Layout.batch_specs).
TOKEN_FIELDS = ("token_ids", "positions", "seq_ids", "slots", "token_mask", "adapter_slots",
                "labels", "loss_weights", "act_index", "feed_rows")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A compiled batch shape."""

    num_tokens: int
    num_seqs: int
    num_pages: int
    """Page-table columns: every sequence's context must fit in this many pages."""
    train: bool = False
    """Whether the batch carries finetuning tokens (loss and activation saving compiled in)."""

    def holds(self, other: Bucket) -> bool:
        """Whether any batch ``other`` holds fits this bucket too (the same kind of step)."""
        return (self.train == other.train and self.num_tokens >= other.num_tokens
                and self.num_seqs >= other.num_seqs and self.num_pages >= other.num_pages)


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """``lo, 2lo, 4lo, ...`` up to and including ``hi`` (``hi`` itself always included)."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return (*out, hi)


LOSS_ROWS_MIN = 4
"""Smallest row count the training loss head is compiled for (``loss_row_sizes``)."""


def loss_row_sizes(num_tokens: int) -> tuple[int, ...]:
    """The row counts a training step of ``num_tokens`` tokens has a loss head for: 0 and
    powers of two from ``LOSS_ROWS_MIN`` up to ``num_tokens``. The step runs the smallest
    that holds its rows with a loss (``loss_head_rows``), so a few finetuning tokens beside
    many decodes pay the vocabulary projection, forward and backward, for their own rows
    rather than for the whole bucket."""
    return (0, *powers_of_two(min(LOSS_ROWS_MIN, num_tokens), num_tokens))


def loss_head_rows(loss_rows: int, num_tokens: int) -> int:
    """The loss head a step of ``num_tokens`` tokens runs for ``loss_rows`` rows with a loss."""
    return next(n for n in loss_row_sizes(num_tokens) if n >= min(loss_rows, num_tokens))


def pick_bucket(
    buckets: tuple[Bucket, ...], num_tokens: int, num_seqs: int, num_pages: int,
    train: bool = False,
) -> Bucket:
    """The first bucket holding the batch (buckets are sorted smallest first)."""
    for b in buckets:
        if (b.num_tokens >= num_tokens and b.num_seqs >= num_seqs and b.num_pages >= num_pages
                and b.train == train):
            return b
    raise ValueError(f"no bucket holds {num_tokens} tokens of {num_seqs} sequences "
                     f"with {num_pages} pages")


@dataclasses.dataclass
class SeqChunk:
    """Host description of one sequence's tokens in a step."""

    token_ids: list[int]
    start_position: int
    page_table: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sample_count: int = 0
    adapter_slot: int = -1
    labels: np.ndarray | None = None  # [n] int32, finetuning windows only
    loss_weights: np.ndarray | None = None  # [n] float32, finetuning windows only
    act_base: int = -1  # activation-store row of position 0; -1 saves nothing
    feed_row: int = -1  # the first token's id is row feed_row of the previous step's samples


def build_batch(chunks: list[SeqChunk], bucket: Bucket, page_size: int) -> TokenBatch:
    """Packs host chunks into a padded ``TokenBatch`` of the bucket's shape (numpy arrays)."""
    t, s = bucket.num_tokens, bucket.num_seqs
    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    seq_ids = np.zeros(t, np.int32)
    slots = np.full(t, -1, np.int32)
    token_mask = np.zeros(t, bool)
    page_tables = np.zeros((s, bucket.num_pages), np.int32)
    logits_indices = np.zeros(s, np.int32)
    temperature = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    seeds = np.zeros(s, np.int32)
    sample_counts = np.zeros(s, np.int32)
    adapter_slots = np.full(t, -1, np.int32)
    labels = np.zeros(t, np.int32)
    loss_weights = np.zeros(t, np.float32)
    act_index = np.full(t, -1, np.int32)
    feed_rows = np.full(t, -1, np.int32)
    cursor = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        pos = np.arange(c.start_position, c.start_position + n, dtype=np.int32)
        table = np.asarray(c.page_table, np.int32)
        sl = slice(cursor, cursor + n)
        token_ids[sl] = c.token_ids
        positions[sl] = pos
        seq_ids[sl] = i
        slots[sl] = table[pos // page_size] * page_size + pos % page_size
        token_mask[sl] = True
        page_tables[i, : len(table)] = table
        logits_indices[i] = cursor + n - 1
        temperature[i], top_k[i], top_p[i] = c.temperature, c.top_k, c.top_p
        seeds[i], sample_counts[i] = c.seed, c.sample_count
        adapter_slots[sl] = c.adapter_slot
        if c.labels is not None:
            labels[sl], loss_weights[sl] = c.labels, c.loss_weights
        if c.act_base >= 0:
            act_index[sl] = c.act_base + pos
        if c.feed_row >= 0:
            feed_rows[cursor] = c.feed_row
        cursor += n
    return TokenBatch(
        token_ids=token_ids, positions=positions, seq_ids=seq_ids, slots=slots,
        token_mask=token_mask, page_tables=page_tables, logits_indices=logits_indices,
        temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
        sample_counts=sample_counts, adapter_slots=adapter_slots, labels=labels,
        loss_weights=loss_weights, act_index=act_index, feed_rows=feed_rows,
    )
