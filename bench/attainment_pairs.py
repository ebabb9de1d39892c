"""Does co-serving cost SLO attainment at one rate? coserve and inference-only on many traces,
each trace run by both (in alternating order), compared trace by trace.

``bench/coserve.py`` judges attainment on two or three traces pooled; at the peak rate, where
a moment's speed of a shared machine decides a run, one trace can move a pooled figure by ten
points either way, and a miss there says little about the scheduler. Here every trace is a
pair (the same arrivals, lengths and prompts under both modes, run back to back, the order
alternating from trace to trace so that a drifting machine favours neither), and the answer
is the paired difference: how many traces each mode did better on, the pooled attainment of
each, and a bootstrap interval of the pooled difference over traces. The summary goes to
BENCHMARKS.md.

    python bench/attainment_pairs.py --find-peak --traces 8          # tiny tier, TPOT 3x
    python bench/attainment_pairs.py --rates 6 --tpot-ms 14.3 --traces 12
"""

from __future__ import annotations

import argparse
import tempfile

import coserve
import numpy as np
from coserve import (
    calibrate_tpot_target,
    find_peak,
    fit_to_model,
    pool_rounds,
    run_one,
    tier_model,
)

from benchlib import library_revision, machine_line, record

MODES = ("inference-only", "coserve")


def run_pairs(model, rate: float, args, run=run_one, log=print) -> list[dict]:
    """Both modes on each of ``args.traces`` traces (seeds ``args.seed`` on), the first mode
    first on even traces and last on odd ones. Returns one record per run."""
    recs = []
    for i in range(args.traces):
        seed = args.seed + i
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            rec = run(model, mode, rate, args, seed=seed)
            recs.append(rec)
            log(f"  trace {seed} {mode:>15}: {coserve._missed(rec)}, finetuning "
                f"{rec['ft_tokens_per_s']:.0f} tok/s{_speed(rec)}")
    return recs


def _speed(rec: dict) -> str:
    """The machine's speed before a run (``machine_slowdown``: padding steps' time over the
    latency model's), where the run measured it: a pair whose runs saw different speeds
    compares the machine as much as the modes."""
    slowdown = rec.get("machine_slowdown")
    return "" if slowdown is None else f", padding steps {slowdown:.2f}x their predicted time"


def paired_summary(recs: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """The pairs' comparison: pooled attainment of each mode, traces on which coserve did
    better / the same / worse, and the pooled difference (coserve minus inference-only) with
    a 90% bootstrap interval over traces (resampling whole pairs)."""
    by = {(r["seed"], r["mode"]): r for r in recs}
    seeds = sorted({r["seed"] for r in recs})
    pairs = [(by[s, "coserve"], by[s, "inference-only"]) for s in seeds]
    served = np.array([[c["requests"], i["requests"]] for c, i in pairs], float)
    met = np.array([[c["slo_attainment"] * c["requests"], i["slo_attainment"] * i["requests"]]
                    for c, i in pairs])

    def difference(rows) -> float:
        pooled = met[rows].sum(axis=0) / served[rows].sum(axis=0)
        return float(pooled[0] - pooled[1])

    rng = np.random.default_rng(seed)
    draws = [difference(rng.integers(0, len(pairs), len(pairs))) for _ in range(resamples)]
    diffs = [c["slo_attainment"] - i["slo_attainment"] for c, i in pairs]
    return {
        "traces": len(pairs),
        "coserve": pool_rounds([c for c, _ in pairs]),
        "inference-only": pool_rounds([i for _, i in pairs]),
        "better": sum(d > 1e-9 for d in diffs), "same": sum(abs(d) <= 1e-9 for d in diffs),
        "worse": sum(d < -1e-9 for d in diffs),
        "difference": difference(np.arange(len(pairs))),
        "interval": (float(np.percentile(draws, 5)), float(np.percentile(draws, 95))),
    }


def describe(rate: float, s: dict) -> str:
    c, i = s["coserve"], s["inference-only"]
    lo, hi = s["interval"]
    return (f"{rate:g} req/s, {s['traces']} traces: coserve {coserve._missed(c)}, "
            f"inference-only {coserve._missed(i)}; coserve better on {s['better']}, the same "
            f"on {s['same']}, worse on {s['worse']}; pooled difference "
            f"{s['difference'] * 100:+.1f} points (90% bootstrap interval {lo * 100:+.1f} to "
            f"{hi * 100:+.1f}); coserve finetuned {c['ft_tokens_per_s']:.0f} tok/s"
            # The machine's speed over the runs (each pooled record keeps its slowest and
            # fastest run's), as bench/coserve.py reports it.
            + "".join(f"; {line}" for line in coserve.drift_lines([c, i])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", help="arrival rates (req/s)")
    p.add_argument("--find-peak", action="store_true",
                   help="run at the peak rate as bench/coserve.py --quick finds it")
    p.add_argument("--traces", type=int, default=8, help="traces (pairs) per rate")
    p.add_argument("--tier", choices=("tiny", "small"), default="tiny")
    p.add_argument("--tpot-multiple", type=float, default=3.0)
    p.add_argument("--tpot-ms", type=float, help="a fixed TPOT target instead (ms)")
    p.add_argument("--ttft-s", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=6.0, help="seconds of trace per run")
    p.add_argument("--min-requests", type=int, default=20,
                   help="a trace lasts long enough to hold this many requests on average")
    p.add_argument("--drain", type=float, default=5.0)
    p.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--gamma-cv", type=float, default=2.0)
    p.add_argument("--scale", type=float, default=0.25, help="ShareGPT length scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trace")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    if bool(args.rates) == args.find_peak:
        p.error("give --rates or --find-peak (one of them)")
    model = tier_model(args.tier, None)
    args.latency_dir = tempfile.mkdtemp(prefix="coserve-pairs-latency-")
    if args.tpot_ms is None:
        tpot = calibrate_tpot_target(model, args)
        print(f"decode TPOT {tpot * 1e3:.2f} ms -> TPOT target {args.tpot_ms:.2f} ms")
    fit_to_model(args)
    rates = args.rates
    if args.find_peak:
        args.rounds = 2
        peak, _ = find_peak(model, args)
        print(f"peak rate: {peak:.2f} req/s")
        rates = [peak]
    lines = []
    for rate in rates:
        lines.append(describe(rate, paired_summary(run_pairs(model, rate, args))))
        print(lines[-1])
    if not args.no_record:

        record(f"Attainment in pairs, coserve and inference-only ({args.tier} tier)", {
            "machine": machine_line(),
            "commit": library_revision(),
            "regime": (f"TPOT target {args.tpot_ms:.1f} ms, TTFT {args.ttft_s:g} s; "
                       f"{args.arrivals} arrivals, trace seeds {args.seed}-"
                       f"{args.seed + args.traces - 1}, {args.duration:g} s of trace or "
                       f"{args.min_requests} requests' worth, ShareGPT lengths "
                       f"x{args.scale:g}" + (" (rate: the peak found)" if args.find_peak
                                              else ""))},
            "\n".join(f"- {line}" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
