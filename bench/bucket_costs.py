"""Is the smallest bucket the cheapest? Decode step time by sequence rows and page width.

A step runs padded to a bucket (tokens, sequences, page-table width). Padding adds work, so
one expects the smallest bucket holding a batch to be the fastest; a compiler may still make
a larger bucket's program the faster one. This script times the inference buckets of the
smallest token count, every sequence count by every page width, as ``Engine.warmup``
measures the latency model (steps of one bucket back to back, their median), all cases in
turn ``--repeats`` times in one process (the machine's drift weighs on each alike), and prints
the medians and, for each bucket, the cheapest bucket that holds what it holds (what
``SchedulingConfig.cheapest_bucket`` makes the scheduler run, from the latency model's
measured times) with its time over the bucket's own.

    python bench/bucket_costs.py --tier tiny         # appends to BENCHMARKS.md
    python bench/bucket_costs.py --tier small --repeats 3 --no-record
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from coserve import engine_config, tier_model

import coserve_jax as cj
from coserve_jax.batch import Bucket

from benchlib import library_revision, machine_line, markdown_table, record


def decode_buckets(engine: cj.Engine) -> list[Bucket]:
    """The inference buckets of the smallest token count (a decode step's)."""
    tokens = min(b.num_tokens for b in engine.buckets)
    return [b for b in engine.buckets if not b.train and b.num_tokens == tokens]


def measure(engine: cj.Engine, buckets: list[Bucket], repeats: int) -> dict[Bucket, float]:
    """Median seconds of each bucket's step over ``repeats`` rounds of every bucket in turn,
    each round's figure the median of steps run back to back (``Engine._padding_times``, as
    warm-up measures them: a step run right after another program's can take up to twice
    as long on the 2-core CPU, and the latency model prices warm steps)."""
    batches = {b: engine._timing_batch(b) for b in buckets}
    rounds: dict[Bucket, list[float]] = {b: [] for b in buckets}
    for _ in range(repeats):
        for b in buckets:
            rounds[b].append(float(np.median(engine._padding_times(
                batches[b], b, seconds=0.05, min_repeats=3))))
    return {b: float(np.median(v)) for b, v in rounds.items()}


def cheapest_holding(bucket: Bucket, seconds: dict[Bucket, float]) -> Bucket:
    """Of the timed buckets that hold whatever ``bucket`` holds, the fastest (the smallest
    of equal times)."""
    holding = [b for b in seconds if b.holds(bucket)]
    return min(holding, key=lambda b: (seconds[b], b.num_seqs, b.num_pages))


def table(seconds: dict[Bucket, float]) -> str:
    """One row per bucket: its median time, the cheapest bucket holding it and the ratio."""
    rows = []
    for b in sorted(seconds, key=lambda b: (b.num_pages, b.num_seqs)):
        best = cheapest_holding(b, seconds)
        rows.append([b.num_seqs, b.num_pages, f"{1e3 * seconds[b]:.2f}",
                     "itself" if best == b else f"{best.num_seqs} rows, {best.num_pages} pages",
                     f"{seconds[best] / seconds[b]:.2f}"])
    return markdown_table(["rows", "pages", "decode step (ms)", "cheapest bucket holding it",
                           "its time / the bucket's"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("tiny", "small"), default="tiny")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    started = time.time()
    config_args = argparse.Namespace(ttft_s=2.0, tpot_ms=1000.0)
    engine = cj.Engine(tier_model(args.tier, None), engine_config("coserve", config_args))
    buckets = decode_buckets(engine)
    seconds = measure(engine, buckets, args.repeats)
    body = table(seconds)
    print(body)
    if not args.no_record:
        record(f"Decode step cost by bucket rows and pages ({args.tier} tier)", {
            "machine": machine_line(),
            "commit": library_revision(),
            "cases": f"inference buckets of {buckets[0].num_tokens} tokens, {args.repeats} "
                     f"rounds of every bucket in turn, each the median of 0.05 s of its steps "
                     f"back to back; medians (greedy, padding batches)",
            "took": f"{time.time() - started:.0f} s",
            "command": f"`python bench/bucket_costs.py --tier {args.tier}`",
        }, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
