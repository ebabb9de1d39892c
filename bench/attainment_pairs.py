"""Does co-serving cost SLO attainment at one rate? coserve and inference-only on many traces,
each trace run by both (in alternating order), compared trace by trace.

``bench/coserve.py`` judges attainment on two or three traces pooled; at the peak rate, where
a moment's speed of a shared machine decides a run, one trace can move a pooled figure by ten
points either way, and a miss there says little about the scheduler. Here every trace is a
pair (the same arrivals, lengths and prompts under both modes, run back to back, the order
alternating from trace to trace so that a drifting machine favours neither), and the answer
is the paired difference: how many traces each mode did better on, the pooled attainment of
each, and a bootstrap interval of the pooled difference over traces. A trace whose runs met
the machine at speeds more than ``--matched-speed`` apart (padding steps probed before and
after each run), or one of whose runs lost more than ``--max-steal`` of the host's CPU time to
other guests, is run again, up to ``--retries`` times; the summary counts those, and ends
with the TPOT target's multiple of the decode TPOT measured before and after the runs. It
goes to BENCHMARKS.md.

    python bench/attainment_pairs.py --find-peak --traces 8          # tiny tier, TPOT 3x
    python bench/attainment_pairs.py --find-peak --fractions 0.5 1 --tpot-multiple 2
    python bench/attainment_pairs.py --rates 6 --tpot-ms 14.3 --traces 12
    python bench/attainment_pairs.py --rates 3 --traces 6 --against-smallest-bucket

``--against-smallest-bucket`` runs both modes twice on every trace, the second time with each
step in the smallest bucket that holds it (``SchedulingConfig.cheapest_bucket`` off), and
compares each engine's pair apart.

``--rivals`` adds other modes to every trace (FlexLLM's ``temporal-seq`` baselines, the
token-level ablation, coserve with one setting changed: ``coserve.COSERVE_VARIANTS``) and
compares coserve's finetuning with each one's the same way: on the same traces, in rotating
order, the pooled tokens/s of each with a bootstrap interval of their ratio over traces,
beside each one's attainment. ``bench/coserve.py`` compares them on
two traces, where one trace's luck can move a rival's attainment across the 95% line.

    python bench/attainment_pairs.py --rates 10 --traces 6 --rivals temporal-seq:dynamic \
        temporal:dynamic
"""

from __future__ import annotations

import argparse
import math

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

from benchlib import library_revision, machine_line, record, scratch_dir

MODES = ("inference-only", "coserve")


def run_pairs(model, rate: float, args, run=run_one, log=print,
              modes: tuple[str, ...] = MODES) -> list[dict]:
    """Every mode on each of ``args.traces`` traces (seeds ``args.seed`` on), the order
    rotating from trace to trace (two modes: the first first on even traces, last on odd
    ones). With ``args.matched_speed`` > 0, a trace whose runs found the machine at speeds
    further apart than that share (``speed_spread``, probed before and after each run), or
    one of whose runs lost more than ``args.max_steal`` of the host's CPU time to other
    guests (``coserve.MAX_STEAL`` where not given), is run again, up to ``args.retries``
    times, and the last try is kept either way, marked ``matched``. Returns one record per
    kept run."""
    recs = []
    matched_speed = getattr(args, "matched_speed", 0.0)
    max_steal = getattr(args, "max_steal", coserve.MAX_STEAL)
    for i in range(args.traces):
        seed = args.seed + i
        order = modes[i % len(modes):] + modes[:i % len(modes)]
        for attempt in range(1 + (getattr(args, "retries", 0) if matched_speed else 0)):
            runs = []
            for mode in order:
                rec = run(model, mode, rate, args, seed=seed)
                runs.append(rec)
                log(f"  trace {seed} {mode:>15}: {coserve._missed(rec)}, finetuning "
                    f"{rec['ft_tokens_per_s']:.0f} tok/s{_speed(rec)}")
            spread = speed_spread(runs)
            stolen = max((r["steal_share"] for r in runs if r.get("steal_share") is not None),
                         default=0.0)
            moved = bool(matched_speed) and spread is not None and spread > 1 + matched_speed
            robbed = bool(matched_speed) and stolen > max_steal
            matched = not (moved or robbed)
            for rec in runs:
                rec["matched"], rec["tries"] = matched, attempt + 1
            if matched:
                break
            why = ([f"the machine's speed moved {spread:.2f}x across its runs (past "
                    "--matched-speed)"] if moved else []) + (
                [f"a run lost {stolen:.1%} of the host's CPU time (past --max-steal)"]
                if robbed else [])
            log(f"  trace {seed}: " + " and ".join(why)
                + (", run again" if attempt < args.retries else ", kept unmatched"))
        recs.extend(runs)
    return recs


def speed_spread(runs: list[dict]) -> float | None:
    """The fastest over the slowest machine speed probed before and after ``runs``
    (``machine_slowdown``, ``machine_slowdown_after``); None where none was probed."""
    probes = [r[k] for r in runs for k in ("machine_slowdown", "machine_slowdown_after")
              if r.get(k)]
    return max(probes) / min(probes) if probes else None


def _speed(rec: dict) -> str:
    """The machine's speed before a run (``machine_slowdown``: padding steps' time over the
    latency model's), where the run measured it: a pair whose runs saw different speeds
    compares the machine as much as the modes."""
    slowdown = rec.get("machine_slowdown")
    if slowdown is None:
        return ""
    after = rec.get("machine_slowdown_after")
    slow = rec.get("slow_step_share")
    steal = rec.get("steal_share")
    return (f", padding steps {slowdown:.2f}x their predicted time"
            + ("" if after is None else f" before it, {after:.2f}x after")
            + ("" if slow is None else f"; {slow:.0%} of its steps past "
               f"{coserve.SLOW_STEP:g}x their measured time")
            + ("" if steal is None else f"; host CPU time stolen {steal:.1%}"))


def paired_summary(recs: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """The pairs' comparison: pooled attainment of each mode, traces on which coserve did
    better / the same / worse, and the pooled difference (coserve minus inference-only) with
    a 90% bootstrap interval over traces (resampling whole pairs)."""
    pairs = trace_pairs(recs, "coserve", "inference-only")
    served = np.array([[c["requests"], i["requests"]] for c, i in pairs], float)
    met = np.array([[c["slo_attainment"] * c["requests"], i["slo_attainment"] * i["requests"]]
                    for c, i in pairs])

    def difference(rows) -> float:
        pooled = met[rows].sum(axis=0) / served[rows].sum(axis=0)
        return float(pooled[0] - pooled[1])

    diffs = [c["slo_attainment"] - i["slo_attainment"] for c, i in pairs]
    return {
        "traces": len(pairs),
        "unmatched": sum(not c.get("matched", True) for c, _ in pairs),
        "tries": sum(c.get("tries", 1) for c, _ in pairs),
        "coserve": pool_rounds([c for c, _ in pairs]),
        "inference-only": pool_rounds([i for _, i in pairs]),
        "better": sum(d > 1e-9 for d in diffs), "same": sum(abs(d) <= 1e-9 for d in diffs),
        "worse": sum(d < -1e-9 for d in diffs),
        "difference": difference(np.arange(len(pairs))),
        "interval": bootstrap_interval(difference, len(pairs), resamples, seed),
    }


def trace_pairs(recs: list[dict], first: str, second: str) -> list[tuple[dict, dict]]:
    """The records of modes ``first`` and ``second`` on each trace, by trace seed."""
    by = {(r["seed"], r["mode"]): r for r in recs}
    return [(by[s, first], by[s, second]) for s in sorted({r["seed"] for r in recs})]


def bootstrap_interval(statistic, count: int, resamples: int, seed: int) -> tuple[float, float]:
    """The 90% bootstrap interval of ``statistic(rows)`` over ``count`` traces, resampling
    whole traces (``rows``: their indices, drawn with replacement)."""
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, count, count)) for _ in range(resamples)]
    return float(np.percentile(draws, 5)), float(np.percentile(draws, 95))


def finetune_summary(recs: list[dict], rival: str, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """coserve's finetuning against ``rival``'s on the same traces: each one's pooled record
    (attainment over all requests; ``ft_tokens_per_s`` over all traces' seconds), the ratio
    of their finetuning tokens with a 90% bootstrap interval over traces (resampling whole
    traces), and the traces on which coserve finetuned more, and on which it did so at an
    attainment at least the rival's."""
    pairs = trace_pairs(recs, "coserve", rival)
    tokens = np.array([[r["ft_tokens_per_s"] * r["duration_s"] for r in pair]
                       for pair in pairs])
    seconds = np.array([[r["duration_s"] for r in pair] for pair in pairs])

    def ratio(rows) -> float:
        made = tokens[rows].sum(axis=0)
        return float(made[0] / made[1]) if made[1] > 0 else math.inf

    more = [c["ft_tokens_per_s"] > r["ft_tokens_per_s"] for c, r in pairs]
    pooled = [pool_rounds([pair[k] for pair in pairs]) for k in (0, 1)]
    for k, rec in enumerate(pooled):  # tokens over seconds, not a mean of rates
        rec["ft_tokens_per_s"] = float(tokens[:, k].sum() / seconds[:, k].sum())
    return {
        "rival": rival, "traces": len(pairs), "coserve": pooled[0], rival: pooled[1],
        "ratio": ratio(np.arange(len(pairs))),
        "interval": bootstrap_interval(ratio, len(pairs), resamples, seed),
        "more": sum(more),
        "more_at_attainment": sum(m and c["slo_attainment"] >= r["slo_attainment"]
                                  for m, (c, r) in zip(more, pairs, strict=True)),
    }


def describe_finetuning(rate: float, s: dict) -> str:
    c, r = s["coserve"], s[s["rival"]]
    lo, hi = s["interval"]
    return (f"{rate:g} req/s, {s['traces']} traces, coserve against {s['rival']}: attainment "
            f"{c['slo_attainment']:.1%} against {r['slo_attainment']:.1%}; finetuning "
            f"{c['ft_tokens_per_s']:.0f} against {r['ft_tokens_per_s']:.0f} tok/s, "
            f"{s['ratio']:.2f}x (90% bootstrap interval {lo:.2f}-{hi:.2f}x); coserve "
            f"finetuned more on {s['more']} traces, {s['more_at_attainment']} of them at an "
            f"attainment at least the rival's")


def variant_records(recs: list[dict], suffix: str, modes: tuple[str, ...] = MODES) -> list[dict]:
    """The records of ``modes`` run with a mode ``suffix`` ("" for none), under their
    plain mode names (what ``paired_summary`` compares)."""
    return [dict(r, mode=r["mode"].removesuffix(suffix))
            for r in recs if r["mode"] in {m + suffix for m in modes}]


def describe(rate: float, s: dict) -> str:
    c, i = s["coserve"], s["inference-only"]
    lo, hi = s["interval"]
    return (f"{rate:g} req/s, {s['traces']} traces: coserve {coserve._missed(c)}, "
            f"inference-only {coserve._missed(i)}; coserve better on {s['better']}, the same "
            f"on {s['same']}, worse on {s['worse']}; pooled difference "
            f"{s['difference'] * 100:+.1f} points (90% bootstrap interval {lo * 100:+.1f} to "
            f"{hi * 100:+.1f}); coserve finetuned {c['ft_tokens_per_s']:.0f} tok/s"
            + (f"; {s['tries'] - s['traces']} traces run again for a machine whose speed "
               f"moved across their runs or whose CPU time other guests took, "
               f"{s['unmatched']} kept unmatched"
               if s.get("tries", s["traces"]) > s["traces"] or s.get("unmatched") else "")
            # The machine's speed over the runs (each pooled record keeps its slowest and
            # fastest run's), as bench/coserve.py reports it.
            + "".join(f"; {line}" for line in coserve.drift_lines([c, i])))


def found_peak_line(fractions: list[float], peak: float) -> str:
    """The regime's note of rates set from the peak the run found."""
    if fractions == [1.0]:
        return f" (rate: the peak found, {peak:g} req/s)"
    return (f" (rates: {', '.join(f'{f:g}' for f in fractions)} of the peak found, "
            f"{peak:g} req/s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", help="arrival rates (req/s)")
    p.add_argument("--find-peak", action="store_true",
                   help="run at the peak rate as bench/coserve.py --quick finds it")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0],
                   help="with --find-peak: run at these fractions of the peak found")
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
    p.add_argument("--scale", type=float,
                   help="ShareGPT length scale (default 0.25; 0.1 on the small tier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trace")
    p.add_argument("--matched-speed", type=float, default=0.3,
                   help="run a trace again when the machine's speed, probed before and after "
                        "each of its runs, moved by more than this share (0: never)")
    p.add_argument("--max-steal", type=float, default=coserve.MAX_STEAL,
                   help="run a trace again when one of its runs lost more than this share "
                        "of the host's CPU time to other guests (with --matched-speed > 0)")
    p.add_argument("--retries", type=int, default=1,
                   help="tries beyond the first for a trace run on a moving or robbed "
                        "machine (and for a peak probe robbed of its CPU time)")
    p.add_argument("--against-smallest-bucket", action="store_true",
                   help="also run both modes with each step in the smallest bucket that holds "
                        "it (the engine before 2026-12-06) on the same traces, and compare "
                        "each pair")
    p.add_argument("--rivals", nargs="+", default=[], metavar="MODE",
                   help="modes also run on every trace, whose finetuning coserve's is "
                        "compared with (e.g. temporal-seq:dynamic temporal:dynamic)")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    args.scale = coserve.length_scale(args)
    args.probe_after = args.matched_speed > 0
    args.steal_retries = args.retries  # (the peak probes' ``coserve.run_calm``)
    if bool(args.rates) == args.find_peak:
        p.error("give --rates or --find-peak (one of them)")
    if args.fractions != [1.0] and not args.find_peak:
        p.error("--fractions goes with --find-peak")
    if any(not 0 < f <= 4 for f in args.fractions):
        p.error("--fractions: each must be in (0, 4]")
    if args.rivals and args.against_smallest_bucket:
        p.error("--rivals and --against-smallest-bucket do not go together")
    for rival in args.rivals:
        if (error := coserve.mode_error(rival)) is not None:  # a clear error before any run
            p.error(f"--rivals: {error}")
        if rival in MODES:
            p.error(f"--rivals: {rival} runs on every trace already")
    model = tier_model(args.tier, None)
    args.latency_dir = scratch_dir("coserve-pairs-latency-")
    if args.tpot_ms is None:
        before = calibrate_tpot_target(model, args)
        print(f"decode TPOT {before * 1e3:.2f} ms -> TPOT target {args.tpot_ms:.2f} ms")
    else:  # a target given in ms: what multiple it is on this machine now
        before = coserve.decode_tpot_now(model, args)
    fit_to_model(args)
    rates = args.rates
    if args.find_peak:
        args.rounds = 2
        peak, _ = find_peak(model, args)
        print(f"peak rate: {peak:.2f} req/s")
        rates = coserve.fraction_rates(peak, args.fractions)
    # Mode suffix -> the label of its pair's line.
    variants = ({"": "cheapest bucket: ", coserve.SMALLEST_BUCKET: "smallest bucket: "}
                if args.against_smallest_bucket else {"": ""})
    modes = tuple(m + suffix for suffix in variants for m in MODES) + tuple(args.rivals)
    lines = []
    for rate in rates:
        recs = run_pairs(model, rate, args, modes=modes)
        for suffix, label in variants.items():
            lines.append(label + describe(rate, paired_summary(variant_records(recs, suffix))))
            print(lines[-1])
        for rival in args.rivals:
            lines.append(describe_finetuning(rate, finetune_summary(recs, rival)))
            print(lines[-1])
    lines.append(coserve.multiple_line(args.tpot_ms / 1e3, before,
                                       coserve.decode_tpot_now(model, args)))
    print(lines[-1])
    if not args.no_record:

        rivals = f"; finetuning against {', '.join(args.rivals)}" if args.rivals else ""
        record(f"Attainment in pairs, coserve and inference-only ({args.tier} tier){rivals}", {
            "machine": machine_line(),
            "commit": library_revision(),
            "regime": (f"TPOT target {args.tpot_ms:.1f} ms, TTFT {args.ttft_s:g} s; "
                       f"{args.arrivals} arrivals, trace seeds {args.seed}-"
                       f"{args.seed + args.traces - 1}, {args.duration:g} s of trace or "
                       f"{args.min_requests} requests' worth, ShareGPT lengths "
                       f"x{args.scale:g}" + (found_peak_line(args.fractions, peak)
                                              if args.find_peak else "")
                       + (f"; a trace run again (at most {args.retries} more "
                          f"{'time' if args.retries == 1 else 'times'}) where the "
                          f"machine's speed moved by more than {args.matched_speed:.0%} "
                          f"across its runs" if args.matched_speed > 0 else ""))},
            "\n".join(f"- {line}" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
