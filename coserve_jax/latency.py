"""The latency model: how long an iteration takes, measured on the hardware at hand.

A step's cost is set by its bucket (padding makes the compute the same for any
batch that fits), so the model is a table of measured times per step bucket,
per backward-piece shape and per whole-sample length bucket, taken at warm-up
and corrected online with an exponential moving average of observed times. It is
saved to a file keyed by hardware, model and engine config so a restart reuses it.

A step bucket's time is that of an all-greedy batch, which skips the vocabulary sort
(``sampling.sample_tokens``); a batch with a row at temperature > 0 sorts every row's
logits, which costs extra by the bucket's rows (``vocab_sort_key``) and is priced on top
(``step_seconds``). On a vocabulary of 49152 the sort of 16 rows doubled a CPU step, so
a table measured on the sorting path priced greedy steps, and above all the training
buckets greedy serving never corrected, at twice their time.

Likewise a training bucket's time is that of a step with no rows carrying a loss: the
loss head (the vocabulary projection and its gradient) runs over the rows with a loss
only, in a few compiled sizes (``batch.loss_row_sizes``), and each size's seconds are
measured apart (``loss_head_key``) and priced on top by the finetuning tokens a step
carries.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import tempfile

from coserve_jax.batch import Bucket, loss_head_rows


@functools.cache  # (a plan prices many buckets, each many times an engine's life)
def bucket_key(b: Bucket) -> str:
    return f"t{b.num_tokens}-s{b.num_seqs}-w{b.num_pages}-{'train' if b.train else 'infer'}"


LATENCY_MODEL_VERSION = 3
"""Part of a saved model's file key: bumped when what a key's time means changes (2: step
buckets are timed greedy, the vocabulary sort apart; 3: training buckets are timed with
no loss rows, the loss head apart)."""


def vocab_sort_key(num_seqs: int) -> str:
    """The extra seconds of a step of ``num_seqs`` rows whose batch samples a row at
    temperature > 0 (the sort of every row's logits over the vocabulary)."""
    return f"vocab-sort-s{num_seqs}"


def loss_head_key(rows: int) -> str:
    """The extra seconds of a training step whose loss head runs over ``rows`` rows (one of
    ``batch.loss_row_sizes``), over the same step with no rows carrying a loss."""
    return f"loss-head-r{rows}"


def piece_key(seq_len: int, num_layers: int, block: int | None = None) -> str:
    """A backward piece's shape: ``num_layers`` layers over a sequence bucket of ``seq_len``
    tokens, or over a ``block`` of them (token-block pieces)."""
    rows = "" if block is None or block >= seq_len else f"-b{block}"
    return f"piece-n{seq_len}-k{num_layers}{rows}"


def sample_key(seq_len: int) -> str:
    """A whole training sample (its forward and full backward in one program) padded to the
    sequence bucket of ``seq_len`` tokens."""
    return f"sample-n{seq_len}"


def sample_part_key(seq_len: int, index: int, count: int) -> str:
    """Part ``index`` of a training sample in the sequence bucket of ``seq_len`` tokens run
    in ``count`` parts (``runner_commands.RunSamplePart``)."""
    return f"sample-n{seq_len}-part{index}of{count}"


class LatencyModel:
    """Predicted seconds for step buckets and backward pieces."""

    def __init__(self, times: dict[str, float] | None = None, smoothing: float = 0.2):
        self.times: dict[str, float] = dict(times or {})
        self.smoothing = smoothing
        self.errors: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)
        """``(key, observed / predicted seconds)`` of the latest observations of measured
        shapes, in order: how far the plans' predictions were off (a diagnostic for the
        benchmarks; the engine never reads it back)."""

    def predict(self, key: str) -> float:
        """Seconds for ``key``. An unmeasured shape predicts 0: it gets tried, and its first
        observation replaces the guess (warm-up measures every shape up front)."""
        return self.times.get(key, 0.0)

    def step_seconds(self, bucket: Bucket, sorts_vocab: bool, loss_rows: int = 0) -> float:
        """Seconds of a step of ``bucket``; ``sorts_vocab``: some row samples at temperature
        > 0, so the step also sorts the vocabulary; ``loss_rows``: rows carrying a finetuning
        loss (a training bucket's loss head)."""
        return (self.predict(bucket_key(bucket)) + self.sort_seconds(bucket, sorts_vocab)
                + self.loss_seconds(bucket, loss_rows))

    def loss_seconds(self, bucket: Bucket, loss_rows: int) -> float:
        """The loss head's share of a step of ``bucket`` with ``loss_rows`` rows carrying a
        loss (0 for none)."""
        if not bucket.train or loss_rows <= 0:
            return 0.0
        return self.predict(loss_head_key(loss_head_rows(loss_rows, bucket.num_tokens)))

    def sort_seconds(self, bucket: Bucket, sorts_vocab: bool) -> float:
        """The vocabulary sort's share of a step of ``bucket`` (0 when ``sorts_vocab`` is
        False: an all-greedy step skips it)."""
        return self.predict(vocab_sort_key(bucket.num_seqs)) if sorts_vocab else 0.0

    def observe(self, key: str, seconds: float) -> None:
        """Folds an observed time into the estimate (the first observation replaces it)."""
        old = self.times.get(key)
        if old:
            self.errors.append((key, seconds / old))
        self.times[key] = seconds if old is None else (
            (1 - self.smoothing) * old + self.smoothing * seconds)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.times, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> LatencyModel | None:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return cls(json.load(f))


def model_file(cache_root: str, *parts: object) -> str:
    """The latency-model file for a (hardware, model, config) combination."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    return os.path.join(cache_root, "latency", f"{digest}.json")
