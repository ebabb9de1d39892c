"""Step costs that depend on the batch, not the bucket: a training step's loss head by the
rows carrying a loss, and an inference step's vocabulary sort.

The latency model prices a step as its bucket's time plus these two (``coserve_jax.
latency``): a training step runs the loss head (the vocabulary projection and its
gradient) over its rows with a loss only, in compiled row counts 0, 4, 8, ... up to the
bucket (``batch.loss_row_sizes``), and a step with a row sampling at temperature > 0
sorts every row's logits. This script times, for the step buckets of 16 sequences and
the narrowest page width of the co-serving benchmark's engine on a tier's model, the
inference bucket greedy and sampling, and the training bucket with 0, 4, 16 and every row
carrying a loss (every row: what every training step paid before the head ran over the
loss rows only). All cases run in turn, ``--repeats`` times, in one process, so the
machine's drift weighs on each alike; the table gives medians and ratios.

    python bench/step_costs.py --tier small      # appends to BENCHMARKS.md
    python bench/step_costs.py --tier tiny --repeats 3 --no-record
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from coserve import engine_config, tier_model

import coserve_jax as cj

from benchlib import library_revision, markdown_table, record


def cases(engine: cj.Engine) -> list[tuple[str, object, object]]:
    """(label, bucket, batch) of every timed case, for the buckets of the most sequences
    and the narrowest page width."""
    seqs = max(b.num_seqs for b in engine.buckets)
    pages = min(b.num_pages for b in engine.buckets)
    out = []
    for b in engine.buckets:
        if b.num_seqs != seqs or b.num_pages != pages:
            continue
        if not b.train:
            out.append(("greedy", b, engine._timing_batch(b)))
            out.append(("sampling", b, engine._timing_batch(b, sorts_vocab=True)))
            continue
        for rows in sorted({0, 4, 16, b.num_tokens}):
            if rows <= b.num_tokens:
                out.append((f"loss rows {rows}", b, engine._timing_batch(b, loss_rows=rows)))
    return out


def measure(engine: cj.Engine, timed: list, repeats: int) -> dict[tuple[int, str], float]:
    """Median seconds of each case by (bucket tokens, label), the cases run in turn
    ``repeats`` times (after one untimed run each: compilation and first runs of branches)."""
    for _, bucket, batch in timed:
        engine._run_padding(batch, bucket)
    seconds: dict[tuple[int, str], list[float]] = {}
    for _ in range(repeats):
        for label, bucket, batch in timed:
            seconds.setdefault((bucket.num_tokens, label), []).append(
                engine._run_padding(batch, bucket))
    return {key: float(np.median(v)) for key, v in seconds.items()}


def table(medians: dict[tuple[int, str], float]) -> str:
    """One row per token count: inference greedy and sampling, training by loss rows."""
    by_tokens: dict[int, dict[str, float]] = {}
    for (tokens, label), s in medians.items():
        by_tokens.setdefault(tokens, {})[label] = s
    rows = []
    for tokens, m in sorted(by_tokens.items()):
        def ms(label: str, m=m) -> str:
            return f"{1e3 * m[label]:.0f}" if label in m else ""

        every, sixteen = m.get(f"loss rows {tokens}"), m.get("loss rows 16")
        rows.append([tokens, ms("greedy"), ms("sampling"), ms("loss rows 0"), ms("loss rows 4"),
                     ms("loss rows 16"), ms(f"loss rows {tokens}"),
                     f"{sixteen / every:.2f}" if every and sixteen else ""])
    return markdown_table(
        ["tokens", "inference, greedy (ms)", "inference, sampling (ms)",
         "training, 0 loss rows (ms)", "4 loss rows (ms)", "16 loss rows (ms)",
         "every row a loss row (ms)", "16 loss rows / every row"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("tiny", "small"), default="small")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    started = time.time()
    config_args = argparse.Namespace(ttft_s=2.0, tpot_ms=1000.0, backward_block=0,
                                     keep_projections=False, safety=0.9)
    engine = cj.Engine(tier_model(args.tier, None),
                       engine_config("coserve+token-level", config_args))
    medians = measure(engine, cases(engine), args.repeats)
    body = table(medians)
    print(body)
    if not args.no_record:
        record(f"Step costs by loss rows and sampling ({args.tier} tier)", {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
                       f"on {jax.default_backend()}",
            "commit": library_revision(),
            "cases": f"buckets of {max(b.num_seqs for b in engine.buckets)} sequences, "
                     f"{args.repeats} rounds of every case in turn, medians",
            "took": f"{time.time() - started:.0f} s",
        }, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
