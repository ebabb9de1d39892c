"""Why co-serving's requests miss their SLO: one coserve run (and inference-only on the same
trace), and for every request that missed, what ran in its decode window.

For each missed request it prints whether TTFT or TPOT missed, the whole samples (or parts
of samples run in parts: "samples" below counts both) that ran while it waited for its first
token, its TPOT against the target, the samples that ran between its first and last token
(count, seconds, and observed / predicted), and the TPOT it would have had without them. A
miss whose samples were predicted well but that would have met the target without them says
the admission check (``Policy.sample_fits``) let through what the requests could not absorb;
one whose samples overran says the prediction did; one that misses without samples says the
iterations themselves (prefill, bursts) did, and inference-only on the same trace shows
whether it misses the same requests.

For each run it also prints how the latency model's predictions erred during the trace
(observed / predicted seconds of steps and of sample units) and whether the errors before
one foretold it: their correlation with the median error of the 20 steps observed just
before, and what is left of the error once divided by that median. A correlation near 0
says the errors are noise around predictions that already follow the machine (the model
adapts each shape's time online): a margin that followed the machine's recent speed would
have nothing to follow. The summary goes to BENCHMARKS.md.

    python bench/coserve_misses.py --rates 8 --seed 1             # tiny tier, TPOT 3x
    python bench/coserve_misses.py --tier small --scale 0.1 --rates 2.5 --tpot-ms 290
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from collections.abc import Iterable

import coserve
import numpy as np
from coserve import calibrate_tpot_target, fit_to_model, run_one, tier_model

from coserve_jax import engine as engine_module
from coserve_jax.latency import sample_key, sample_part_key

from benchlib import library_revision, machine_line, record, scratch_dir

CONTEXT_STEPS = 20
"""The step observations before each observation whose median error ``error_memory`` sets
against it."""


class TracedEngine(engine_module.Engine):
    """An engine that keeps each finished request's metrics by id and records when each
    whole sample ran (with its predicted seconds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples: list[tuple[float, float, float]] = []  # (start, end, predicted s)
        self.metrics_by_id: dict[str, object] = {}
        TracedEngine.last = self

    def step(self):
        outputs = super().step()
        self.metrics_by_id |= {o.request_id: o.metrics for o in outputs if o.finished}
        return outputs

    def _whole_sample_iteration(self, plan, t_start):
        predicted = self.latency.predict(self.unit_key(plan))
        start = time.monotonic()
        outputs = super()._whole_sample_iteration(plan, t_start)
        self.samples.append((start, time.monotonic(), predicted))
        return outputs

    def unit_key(self, plan) -> str:
        """The latency model's key of the sample unit ``plan`` runs: the next part of a
        sample run in parts, or a whole sample (before 2026-12-06 a part was compared with
        its whole sample's price, which made every part look 3-7x cheaper than predicted)."""
        if plan.sample_part:
            bucket, index = self.trainer.next_sample_part()
            return sample_part_key(bucket, index, self.trainer.sample_parts)
        return sample_key(self.trainer.next_sample_bucket())


def misses(engine: TracedEngine) -> list[dict]:
    """One row per finished request that missed its SLO."""
    samples = np.array(engine.samples).reshape(-1, 3)
    rows = []
    for rid, m in engine.metrics_by_id.items():
        if m.slo_attained:
            continue
        first, last = m.first_token_time, m.finish_time
        inside = samples[(samples[:, 0] >= first) & (samples[:, 1] <= last)] if (
            first is not None) else samples[:0]
        spent = float((inside[:, 1] - inside[:, 0]).sum())
        # Whole samples that ran while it waited for its first token.
        waited = samples[(samples[:, 1] > m.arrival_time)
                         & (samples[:, 0] < (first if first is not None else last))]
        n = m.num_output_tokens
        over = _over(inside)
        rows.append({
            "id": rid, "ttft_s": m.ttft_s, "tpot_ms": m.tpot_s * 1e3,
            "ttft_missed": m.ttft_s is None or m.ttft_s > m.slo.ttft_s,
            "tokens": n, "samples": len(inside), "sample_s": spent,
            "ttft_samples": len(waited),
            "ttft_sample_s": float((waited[:, 1] - waited[:, 0]).sum()),
            "sample_over": float(over.mean()) if len(over) else float("nan"),
            "tpot_without_ms": ((last - first - spent) / (n - 1) * 1e3) if n > 1 else 0.0,
        })
    return rows


def error_memory(errors: Iterable[tuple[str, float]],
                 context: int = CONTEXT_STEPS) -> dict[str, dict[str, float]]:
    """How the latency model erred (``errors``: its ``LatencyModel.errors``, which
    ``run_one`` keeps from the trace's start, shapes never measured before left out), by
    kind of unit ("step": step buckets; "sample": whole samples and their parts), and
    whether the errors just before foretold each error: ``n``, the error's (observed /
    predicted) ``p50`` and ``p90``, its correlation ``corr`` with the median error of the
    ``context`` step observations before it (NaN with too few), and the ``p90`` of the
    error divided by that median (``p90_adjusted``: the overrun a prediction scaled by the
    recent steps' error would have left)."""
    recent: collections.deque[float] = collections.deque(maxlen=context)
    pairs: dict[str, list[tuple[float, float]]] = {"step": [], "sample": []}
    for key, error in errors:
        # (``latency.bucket_key``: "t<tokens>-..."; ``sample_key`` and
        # ``sample_part_key``: "sample-n<tokens>..."; other keys are pieces and extras.)
        kind = ("step" if key[:1] == "t" and key[1:2].isdigit() else
                "sample" if key.startswith("sample-") else None)
        if kind is None:
            continue
        if len(recent) == context:
            pairs[kind].append((error, float(np.median(recent))))
        if kind == "step":
            recent.append(error)
    out = {}
    for kind, rows in pairs.items():
        if not rows:
            continue
        error, before = np.array(rows).T
        varied = len(rows) > 2 and error.std() > 0 and before.std() > 0
        out[kind] = {"n": len(rows), "p50": float(np.median(error)),
                     "p90": float(np.percentile(error, 90)),
                     "corr": float(np.corrcoef(error, before)[0, 1]) if varied else math.nan,
                     "p90_adjusted": float(np.percentile(error / before, 90))}
    return out


def memory_line(memory: dict[str, dict[str, float]]) -> str:
    """``error_memory`` in a line."""
    return "; ".join(
        f"{kind}s: observed / predicted p50 {m['p50']:.2f}, p90 {m['p90']:.2f} over {m['n']}, "
        f"correlation with the median of the {CONTEXT_STEPS} steps before {m['corr']:.2f}, "
        f"p90 over that median {m['p90_adjusted']:.2f}" for kind, m in memory.items()) or (
        "no predicted unit observed")


def _over(samples: np.ndarray) -> np.ndarray:
    """Observed / predicted seconds of the ``samples`` rows (start, end, predicted) that have
    a prediction (an unmeasured unit predicts 0 s)."""
    priced = samples[samples[:, 2] > 0]
    return (priced[:, 1] - priced[:, 0]) / priced[:, 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", required=True)
    p.add_argument("--tier", choices=("tiny", "small"), default="tiny")
    p.add_argument("--tpot-multiple", type=float, default=3.0)
    p.add_argument("--tpot-ms", type=float)
    p.add_argument("--ttft-s", type=float, default=2.0)
    p.add_argument("--duration", type=float,
                   help="seconds of trace (default: as bench/coserve.py --quick sets it)")
    p.add_argument("--drain", type=float, default=5.0)
    p.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--gamma-cv", type=float, default=2.0)
    p.add_argument("--scale", type=float,
                   help="ShareGPT length scale (default 0.25; 0.1 on the small tier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["inference-only", "coserve"])
    p.add_argument("--backward-block", type=int, default=0,
                   help="EngineConfig.backward_block (0: whole-sequence backward pieces)")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    args.scale = coserve.length_scale(args)
    args.duration_given = args.duration is not None
    args.duration = args.duration or 6.0
    model = tier_model(args.tier, None)
    if args.tpot_ms is None:
        tpot = calibrate_tpot_target(model, args)
        print(f"decode TPOT {tpot * 1e3:.2f} ms -> target {args.tpot_ms:.2f} ms")
    fit_to_model(args)
    args.latency_dir = scratch_dir("coserve-misses-latency-")
    coserve.Engine = TracedEngine  # run_one builds its engine through this name
    summary = []
    for rate in args.rates:
        for mode in args.modes:
            rec = run_one(model, mode, rate, args)
            engine = TracedEngine.last
            rows = misses(engine)
            s = np.array(engine.samples).reshape(-1, 3)
            over = _over(s)
            priced = ("" if not len(over) else  # (no sample unit with a prediction ran)
                      f" (observed / predicted p50 {np.median(over):.2f}, "
                      f"p90 {np.percentile(over, 90):.2f})")
            caused = [r for r in rows if r["samples"] and not r["ttft_missed"]
                      and r["tpot_without_ms"] <= args.tpot_ms]
            waited = [r for r in rows if r["ttft_missed"] and r["ttft_samples"]]
            summary.append(
                f"{mode} @ {rate:g} req/s: attainment {rec['slo_attainment']:.1%} of "
                f"{rec['requests']} requests, finetuning {rec['ft_tokens_per_s']:.0f} tok/s "
                f"(unit {rec['finetune_unit']}), {len(s)} sample units, whole or parts"
                f"{priced}; TTFT p99 "
                f"{rec['ttft_p99_s']:.2f} s, TPOT p99 {rec['tpot_p99_s'] * 1e3:.1f} ms; "
                f"{len(rows)} missed: {len(caused)} would have met the TPOT target without "
                f"the sample units in their decode window, {len(waited)} missed TTFT with "
                f"sample units run while they waited. Prediction errors during the trace "
                f"(excluding shapes first seen): "
                f"{memory_line(error_memory(engine.latency.errors))}")
            print("\n" + summary[-1])
            for r in sorted(rows, key=lambda r: r["tpot_ms"]):
                print(f"  {r['id']:>6}: {'TTFT' if r['ttft_missed'] else 'TPOT'} miss, "
                      f"TTFT {r['ttft_s']:.3f} s ({r['ttft_samples']} samples, "
                      f"{r['ttft_sample_s'] * 1e3:.0f} ms before it), "
                      f"TPOT {r['tpot_ms']:.2f} ms over "
                      f"{r['tokens']} tokens; {r['samples']} samples inside, "
                      f"{r['sample_s'] * 1e3:.0f} ms (obs/pred {r['sample_over']:.2f}); "
                      f"TPOT without them {r['tpot_without_ms']:.2f} ms")
    if not args.no_record:

        record(f"Why requests miss ({args.tier} tier)", {
            "machine": machine_line(),
            "commit": library_revision(),
            "regime": f"TPOT target {args.tpot_ms:.1f} ms, TTFT {args.ttft_s:g} s; "
                      f"{args.arrivals} arrivals, seed {args.seed}, {args.duration:.3g} s of "
                      f"trace, ShareGPT lengths x{args.scale:g}"},
            "\n".join(f"- {line}" for line in summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
