"""``bench/coserve.py``'s arithmetic, without an engine: the separate-cluster baseline, the
pooling of rounds, run lengths fitted to the model, and the target checks with what bounds
a miss."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
coserve = pytest.importorskip("coserve")


def rec(mode: str, rate: float, attainment: float, ft: float, tpot_p50_s: float = 0.003,
        **extra) -> dict:
    return {"mode": mode, "rate": rate, "slo_attainment": attainment, "ft_tokens_per_s": ft,
            "ttft_p50_s": 0.01, "ttft_p99_s": 0.02, "tpot_p50_s": tpot_p50_s,
            "tpot_p99_s": 2 * tpot_p50_s, "inference_tokens_per_s": 100.0 * rate} | extra


def test_separate_cluster_serves_rate_over_f_on_f_of_the_machine():
    inference = [rec("inference-only", r, a, 0.0) for r, a in
                 ((4.0, 1.0), (8.0, 0.97), (16.0, 0.5), (16 / 3, 0.99))]
    out = {r["mode"]: r for r in coserve.separate_cluster(inference, [4.0], 1000.0, peak=16.0)}
    assert out["separate:25%"]["slo_attainment"] == 0.5  # inference-only at 4 / 0.25
    assert out["separate:25%"]["ft_tokens_per_s"] == pytest.approx(750.0)
    assert out["separate:50%"]["slo_attainment"] == 0.97
    assert out["separate:75%"]["inference_tokens_per_s"] == pytest.approx(100 * 16 / 3 * 0.75)
    assert out["separate:75%"]["ft_tokens_per_s"] == pytest.approx(250.0)
    assert {r["rate_fraction"] for r in out.values()} == {0.25}


def test_pooled_attainment_weighs_rounds_by_their_requests():
    a = rec("coserve", 4.0, 1.0, 100.0, requests=30, refused=0, unfinished=0, steps=10,
            mixed_steps=5, whole_samples=0)
    b = rec("coserve", 4.0, 0.5, 300.0, requests=10, refused=1, unfinished=2, steps=10,
            mixed_steps=5, whole_samples=0)
    pooled = coserve.pool_rounds([a, b])
    assert pooled["slo_attainment"] == pytest.approx(35 / 40)
    assert pooled["ft_tokens_per_s"] == pytest.approx(200.0)
    assert (pooled["requests"], pooled["unfinished"], pooled["rounds"]) == (40, 2, 2)
    assert pooled["round_attainment"] == [1.0, 0.5]


def test_runs_last_long_enough_for_a_slow_models_requests():
    args = argparse.Namespace(tpot_ms=184.0, ttft_s=2.0, drain=5.0, duration=6.0, scale=0.1,
                              max_model_len=512, duration_given=False)
    coserve.fit_to_model(args)
    longest = coserve.longest_request(args)
    assert args.drain == pytest.approx(2.0 + longest * 0.184)
    assert args.duration == pytest.approx(5 * coserve.SHAREGPT_MEAN_OUTPUT * 0.1 * 0.184)
    given = argparse.Namespace(**(vars(args) | {"duration": 6.0, "duration_given": True}))
    coserve.fit_to_model(given)
    assert given.duration == 6.0


def test_checks_name_the_best_rival_that_keeps_the_attainment():
    recs = [rec("coserve", 4.0, 0.99, 900.0, rate_fraction=0.5),
            rec("inference-only", 4.0, 1.0, 0.0, tpot_p50_s=0.003),
            rec("temporal-seq:64", 4.0, 0.97, 400.0),
            rec("temporal-seq:dynamic", 4.0, 0.80, 1200.0),  # breaks the SLO: not a rival
            rec("temporal:dynamic", 4.0, 0.96, 800.0),
            rec("separate:50%", 4.0, 0.98, 500.0)]
    lines = coserve.compare(recs, [4.0], 1000.0, tpot_target_s=0.009, ft_whole=1300.0)
    text = "\n".join(lines)
    assert lines[0].startswith("finetune-only: 1000 tok/s token-level, 1300 tok/s")
    assert "coserve 99.0% -> OK" in text
    # 1 - 3 ms / 9 ms of the fastest finetune-only, 1300 tok/s in whole samples
    assert "compute bound 867 tok/s" in text
    assert "1.80x best separate split, separate:50%" in text and "-> OK (>= 1.0x)" in text
    seq = next(x for x in lines if "temporal-seq" in x)
    assert "2.25x best temporal-seq (FlexLLM's baseline), temporal-seq:64" in seq
    assert "-> OK (>= 2.0x)" in seq and "compute bound allows" not in seq
    ablation = next(x for x in lines if "ablation" in x)
    assert "1.12x" in ablation and "-> OK (>= 1.1x)" in ablation


def test_a_miss_comes_with_what_bounds_it():
    recs = [rec("coserve", 4.0, 0.99, 600.0, rate_fraction=0.5),
            rec("inference-only", 4.0, 1.0, 0.0, tpot_p50_s=0.003),
            rec("temporal-seq:64", 4.0, 0.97, 500.0)]
    seq = next(x for x in coserve.compare(recs, [4.0], 1000.0, tpot_target_s=0.009,
                                          ft_whole=1300.0) if "temporal-seq" in x)
    assert "1.20x" in seq and "MISSED (>= 2.0x)" in seq
    # 867 / 500 and 1300 / 500
    assert "the compute bound allows 1.73x, the whole machine finetuning 2.60x" in seq
    # Where the run measured its inference's time as steps of their own (55%): 1300 x 0.45
    recs[0]["inference_alone_fraction"] = 0.55
    seq = next(x for x in coserve.compare(recs, [4.0], 1000.0, tpot_target_s=0.009,
                                          ft_whole=1300.0) if "temporal-seq" in x)
    assert ("the compute bound allows 1.73x, the time coserve's inference left at its "
            "batches 1.17x, the whole machine finetuning 2.60x") in seq


def test_a_coserve_runs_time_is_split_between_its_inference_and_its_finetuning():
    co = rec("coserve", 4.0, 0.99, 40.0, inference_alone_fraction=0.6, mean_batch=3.2,
             sample_token_share=0.25, sample_parts=12)
    inf = rec("inference-only", 4.0, 1.0, 0.0, inference_alone_fraction=0.85, mean_batch=1.8)
    line = next(x for x in coserve.compare([co, inf], [4.0], 70.0, ft_whole=110.0)
                if "inference alone" in x)
    # 40 tok/s over the 40% of the time its inference left
    assert ("inference alone would have taken 60% of the time at a mean batch of 3.2 "
            "sequences (inference-only's 85% at 1.8); in the 40% left its finetuning made "
            "100 tok/s, 25% of its finetuning tokens in whole samples (12 iterations ran "
            "parts of samples; finetune-only 70 tok/s token-level, 110 in whole samples)"
            ) in line
    # Inference alone took (nearly) all the time: no rate over what is left.
    busy = co | {"inference_alone_fraction": 0.99}
    line = next(x for x in coserve.compare([busy, inf], [4.0], 70.0, ft_whole=110.0)
                if "inference alone" in x)
    assert "it left 1% of the time, within the prediction's error" in line
    assert "made" not in line


def test_the_compute_bound_counts_inference_onlys_idle_time():
    busy = rec("inference-only", 4.0, 1.0, 0.0, tpot_p50_s=0.003)
    # Busy all the time: only the stretch of each iteration to the target is left.
    assert coserve.compute_bound(busy, 1300.0, 0.009) == pytest.approx(1300 * (1 - 3 / 9))
    # Idle half the time: that half, and the stretch of the busy half.
    half = busy | {"busy_fraction": 0.5}
    assert coserve.compute_bound(half, 1300.0, 0.009) == pytest.approx(1300 * (1 - 0.5 / 3))
    line = next(x for x in coserve.compare(
        [rec("coserve", 4.0, 0.99, 900.0), half], [4.0], 1000.0, tpot_target_s=0.009,
        ft_whole=1300.0) if "compute bound" in x)
    assert "compute bound 1083 tok/s" in line and "busy 50% of the time" in line


def test_below_half_of_peak_the_ratios_are_reported_not_judged():
    recs = [rec("coserve", 2.0, 1.0, 600.0, rate_fraction=0.25),
            rec("inference-only", 2.0, 1.0, 0.0),
            rec("temporal-seq:64", 2.0, 1.0, 500.0)]
    seq = next(x for x in coserve.compare(recs, [2.0], 1000.0) if "temporal-seq" in x)
    assert seq.endswith("-> reported; coserve keeps 60% of finetune-only")


def test_runs_on_a_slowed_machine_are_named():
    counts = dict(requests=10, refused=0, unfinished=0, steps=5, mixed_steps=0,
                  whole_samples=0)
    rounds = [rec("coserve", 4.0, 1.0, 100.0, machine_slowdown=s, **counts) for s in (1.02, 1.4)]
    pooled = coserve.pool_rounds(rounds)
    assert pooled["machine_slowdown"] == 1.4  # the slowest round's, not the mean
    assert pooled["machine_slowdown_min"] == 1.02  # and the fastest's
    steady = rec("inference-only", 4.0, 1.0, 0.0, machine_slowdown=0.97)
    split = rec("separate:50%", 4.0, 1.0, 500.0)  # computed, not run: no probe
    (line,) = coserve.drift_lines([pooled, steady, split])
    assert "took 0.97-1.40x their time" in line
    assert line.endswith("past 1.15x (figures from a slower machine than the rest): "
                         "coserve @ 4 (1.40x)")
    (line,) = coserve.drift_lines([steady])
    assert line.endswith("no run past 1.15x or below 0.87x")
    assert coserve.drift_lines([split]) == []
    # A run faster than its latency model's measurement: that model priced its work dear.
    fast = coserve.pool_rounds([rec("coserve", 2.0, 1.0, 100.0, machine_slowdown=s, **counts)
                                for s in (0.55, 1.0)])
    (line,) = coserve.drift_lines([fast, pooled])
    assert "took 0.55-1.40x" in line
    assert line.endswith("(1.40x); below 0.87x (a latency model measured on a slower machine "
                         "than the run's: it priced the work dear): coserve @ 2 (0.55x)")


def test_latency_model_keeps_how_far_its_predictions_were_off():
    from coserve_jax.latency import LatencyModel

    model = LatencyModel(smoothing=0.5)
    model.observe("step", 0.010)  # the first observation is the prediction, no error yet
    model.observe("step", 0.020)  # 2x the 10 ms predicted; the estimate moves to 15 ms
    model.observe("step", 0.015)
    assert [key for key, _ in model.errors] == ["step", "step"]
    assert [error for _, error in model.errors] == pytest.approx([2.0, 1.0])


def test_prediction_error_is_pooled_over_the_rounds_that_measured_it():
    counts = dict(requests=10, refused=0, unfinished=0, steps=5, mixed_steps=0,
                  whole_samples=0)
    a = rec("coserve", 4.0, 1.0, 100.0, prediction_error_p50=1.0,
            prediction_error_p90=1.4, **counts)
    b = rec("coserve", 4.0, 1.0, 100.0, **counts)  # a round that timed nothing
    c = rec("coserve", 4.0, 1.0, 100.0, prediction_error_p50=1.2,
            prediction_error_p90=2.0, **counts)
    pooled = coserve.pool_rounds([a, b, c])
    assert pooled["prediction_error_p90"] == pytest.approx(1.7)
    rows = coserve.table([pooled, b | {"mode": "separate:50%"}], 1000.0).splitlines()
    assert rows[2].endswith("| 1.10/1.70 |") and rows[3].endswith("|  |")


def test_a_ratio_is_reported_even_when_no_rival_keeps_the_attainment():
    recs = [rec("coserve", 4.0, 0.99, 600.0, rate_fraction=0.5),
            rec("inference-only", 4.0, 1.0, 0.0),
            rec("temporal:dynamic", 4.0, 0.74, 400.0),
            rec("temporal:16", 4.0, 0.60, 800.0)]
    ablation = next(x for x in coserve.compare(recs, [4.0], 1000.0) if "ablation" in x)
    # Against the rival closest to coserve's attainment, not the one that finetunes most.
    assert "no temporal (token-level ablation) variant reaches 95.0%" in ablation
    assert "best temporal:dynamic at 74.0%, 400 tok/s" in ablation
    assert ablation.endswith("coserve finetunes 1.50x as much at its higher attainment")


def scripted_inference_only(runs: dict[float, list[float]], seen: list):
    """A ``run_one`` that gives inference-only's attainment by rate, in the order of the
    trace seeds it runs (20 requests a trace), and records each (rate, seed) it ran."""
    def run_one(model, mode, rate, args, seed):
        assert mode == "inference-only"
        seen.append((rate, seed))
        return rec(mode, rate, runs[rate].pop(0), 0.0, seed=seed, requests=20, refused=0,
                   unfinished=0, steps=1, mixed_steps=0, whole_samples=0)
    return run_one


def test_a_peak_probe_pools_every_rounds_trace_and_a_failing_one_runs_as_many_more(
        monkeypatch):
    # At 4 req/s the two rounds' traces miss a little (3 of 40: chance could do that at 95%),
    # two more traces hold and all four pooled keep 95%: 4 holds. At 8 they miss 18 of 40,
    # past chance: no more traces. The bisection finds that 6 holds on the rounds' traces
    # alone and 7 does not, with two more traces either; 6 holds again on two new traces.
    runs = {2.0: [1.0, 1.0], 4.0: [0.9, 0.95, 1.0, 1.0], 8.0: [0.5, 0.6],
            6.0: [1.0, 0.95, 1.0, 1.0], 7.0: [1.0, 0.8, 0.9, 0.9]}
    seen = []
    monkeypatch.setattr(coserve, "run_one", scripted_inference_only(runs, seen))
    args = argparse.Namespace(seed=3, rounds=2)
    lines = []
    peak, probes = coserve.find_peak(None, args, bisections=2, log=lines.append)
    assert peak == 6.0
    seeds = {2.0: (3, 4), 4.0: (3, 4, 5, 6), 8.0: (3, 4), 6.0: (3, 4), 7.0: (3, 4, 5, 6)}
    assert seen == [(r, s) for r in (2.0, 4.0, 8.0, 6.0, 7.0) for s in seeds[r]] + [
        (6.0, 5), (6.0, 6)]
    assert not any(runs.values())  # every scripted trace ran
    assert [p["seed"] for p in probes] == [s for _, s in seen]
    assert "92.5%" in lines[1] and "with 2 more, 96.2%" in lines[1]
    assert "6.00 req/s (confirming, new traces)" in lines[-1]
    assert "98.8% (1 of 80 missed) over 4 traces" in lines[-1]


def test_a_peak_that_fails_on_new_traces_is_searched_again_below_on_twice_the_traces(
        monkeypatch):
    # One trace a probe. 3.5 req/s holds on its trace and misses 14 of 20 on the next: pooled,
    # 35% of 40 missed, past chance. The search starts again below 3.5 on two traces a probe:
    # 1.75 holds, 2.625 misses 10 of 40, 2.1875 holds (3, held on one trace, is not the peak).
    runs = {2.0: [1.0], 4.0: [0.5], 3.0: [1.0], 3.5: [1.0, 0.3], 1.75: [1.0, 1.0],
            2.625: [1.0, 0.5], 2.1875: [1.0, 0.95]}
    seen = []
    monkeypatch.setattr(coserve, "run_one", scripted_inference_only(runs, seen))
    lines = []
    peak, probes = coserve.find_peak(None, argparse.Namespace(seed=0, rounds=1),
                                     bisections=2, log=lines.append)
    assert peak == 2.1875
    assert seen == [(2.0, 0), (4.0, 0), (3.0, 0), (3.5, 0), (3.5, 1), (1.75, 0), (1.75, 1),
                    (2.625, 0), (2.625, 1), (2.1875, 0), (2.1875, 1)]
    assert not any(runs.values()) and len(probes) == len(seen)
    assert "3.50 req/s (confirming, new traces)" in lines[4] and "over 2 traces" in lines[4]
    assert "97.5% (1 of 40 missed) over 2 traces" in lines[-1]


def test_a_peak_search_that_starts_past_the_peak_halves_down_to_a_rate_held(monkeypatch):
    runs = {2.0: [0.2], 1.0: [0.4], 0.5: [1.0], 0.75: [1.0, 1.0], 0.875: [0.1]}
    seen = []
    monkeypatch.setattr(coserve, "run_one", scripted_inference_only(runs, seen))
    peak, _ = coserve.find_peak(None, argparse.Namespace(seed=0, rounds=1), bisections=2,
                                log=lambda line: None)
    assert peak == 0.75 and not any(runs.values())
    assert [r for r, _ in seen] == [2.0, 1.0, 0.5, 0.75, 0.875, 0.75]


@pytest.mark.parametrize("missed, requests, chance", [
    (5, 56, True), (2, 40, True), (10, 64, False), (276, 400, False), (0, 0, True),
    (230, 4000, True), (300, 4000, False)])
def test_a_failure_chance_could_have_made_is_told_from_the_loads(missed, requests, chance):
    run = {"requests": requests, "slo_attainment": 1 - missed / requests if requests else 1.0}
    assert coserve.could_be_chance(run, 0.95) is chance


def test_a_run_robbed_of_cpu_time_runs_again_and_the_report_names_one_kept(monkeypatch):
    # Stolen shares of the host's CPU time, run by run: coserve's first run is robbed and its
    # second is not; inference-only is robbed on all three tries and kept anyway.
    steals = {"coserve": [0.2, 0.01], "inference-only": [0.3, 0.1, 0.06]}

    def run_one(model, mode, rate, args, seed):
        return rec(mode, rate, 1.0, 0.0, seed=seed, requests=20, steal_share=steals[mode].pop(0))

    monkeypatch.setattr(coserve, "run_one", run_one)
    args = argparse.Namespace(steal_retries=2, max_steal=0.05)
    lines = []
    co = coserve.run_calm(None, "coserve", 4.0, args, seed=1, log=lines.append)
    inf = coserve.run_calm(None, "inference-only", 4.0, args, seed=1, log=lines.append)
    assert (co["tries"], co["calm"], co["steal_share"]) == (2, True, 0.01)
    assert (inf["tries"], inf["calm"]) == (3, False)
    assert lines[0] == "  coserve @ 4 req/s (seed 1): host CPU time stolen 20.0%, run again"
    assert lines[-1].endswith("stolen 6.0%, kept")
    pooled = coserve.pool_rounds([co, inf | {"mode": "coserve"}])
    assert (pooled["reruns"], pooled["uncalm"]) == (3, 1)
    assert coserve.steal_line([pooled, {"rate": 2.0, "tries": 2, "calm": False}], 0.05) == (
        "host CPU time stolen: 4 run(s) run again past 5% stolen; kept although stolen from: "
        "coserve @ 4, peak probe @ 2")
    steals["coserve"].append(0.5)  # no retries unless asked for, whatever was stolen
    once = coserve.run_calm(None, "coserve", 4.0, argparse.Namespace(), log=lines.append)
    assert (once["tries"], once["calm"]) == (1, False)


def test_a_trace_holds_the_minimum_number_of_requests_at_low_rates():
    args = argparse.Namespace(duration=6.0, min_requests=30)
    assert coserve.trace_seconds(1.5, args) == pytest.approx(20.0)
    assert coserve.trace_seconds(24.0, args) == 6.0
    assert coserve.trace_seconds(0.0, args) == 6.0  # finetune-only: no requests
    assert coserve.trace_seconds(1.5, argparse.Namespace(duration=6.0)) == 6.0


def test_each_round_runs_every_mode_on_its_own_trace(monkeypatch):
    counts = dict(requests=20, refused=0, unfinished=0, steps=5, mixed_steps=0,
                  whole_samples=0)
    calls = []

    def run_one(model, mode, rate, args, seed=None):
        calls.append((mode, rate, seed))
        attainment = 0.9 if seed == 6 else 1.0
        return rec(mode, rate, attainment, 0.0 if mode == "inference-only" else 100.0,
                   seed=seed, **counts)

    probes = [rec("inference-only", 4.0, 0.95, 0.0, seed=5, **counts),
              rec("inference-only", 4.0, 1.0, 0.0, seed=6, **counts)]
    monkeypatch.setattr(coserve, "run_one", run_one)
    monkeypatch.setattr(coserve, "find_peak", lambda *a, **k: (4.0, probes))
    args = argparse.Namespace(tpot_ms=10.0, ttft_s=2.0, drain=1.0, duration=6.0, scale=0.25,
                              max_model_len=512, duration_given=True, rates=None,
                              fractions=[1.0], modes=["coserve", "inference-only"], rounds=2,
                              seed=5, peak_bisections=0, peak=None, json=None,
                              separate=True, xla_options="", unroll_layers=None)
    shown, regime = coserve.run_regime(None, args, log=lambda _: None)
    served = [c for c in calls if c[1] > 0]
    # Every mode at every rate once per round, on that round's trace; inference-only at the
    # peak too (the probes ran minutes before the rounds: they are not reused).
    expected = [("coserve", 4.0)] + [("inference-only", round(4.0 / f, 6))
                                     for f in (1.0, *coserve.SEPARATE_FRACTIONS)]
    assert sorted(served) == sorted((m, r, s) for m, r in expected for s in (5, 6))
    inference = next(r for r in shown if r["mode"] == "inference-only" and r["rate"] == 4.0)
    assert inference["round_seeds"] == [5, 6]
    assert inference["round_attainment"] == [1.0, 0.9]
    assert regime["peak_rate"] == 4.0 and regime["rates"] == [4.0]
    assert [p["seed"] for p in regime["peak_probes"]] == [5, 6]


def test_longer_periods_run_where_no_shorter_one_keeps_coserves_attainment(monkeypatch):
    """FlexLLM's baseline is the best ``temporal-seq`` period that keeps coserve's attainment:
    where the run's ``:64`` and ``:dynamic`` keep none, ``:128``, ``:256``, ``:512`` run in
    turn on the rounds' traces until one does; where one kept it, nothing more runs."""
    counts = dict(requests=20, refused=0, unfinished=0, steps=5, mixed_steps=0,
                  whole_samples=0)
    kept = {"temporal-seq:64": 0.8, "temporal-seq:dynamic": 0.85, "temporal-seq:128": 0.9,
            "temporal-seq:256": 0.96, "temporal-seq:512": 1.0}
    finetuning = {"temporal-seq:64": 800.0, "temporal-seq:dynamic": 900.0,
                  "temporal-seq:128": 400.0, "temporal-seq:256": 200.0,
                  "temporal-seq:512": 100.0, "coserve": 600.0, "inference-only": 0.0}
    calls = []

    def run_one(model, mode, rate, args, seed=None):
        calls.append((mode, rate, seed))
        attainment = 0.97 if rate == 2.0 and mode == "temporal-seq:64" else kept.get(mode, 1.0)
        return rec(mode, rate, attainment, finetuning.get(mode, 100.0), seed=seed, **counts)

    monkeypatch.setattr(coserve, "run_one", run_one)
    args = argparse.Namespace(tpot_ms=10.0, ttft_s=2.0, drain=1.0, duration=6.0, scale=0.25,
                              max_model_len=512, duration_given=True, rates=[2.0, 4.0],
                              fractions=None, modes=["inference-only", "coserve",
                                                     "temporal-seq:64", "temporal-seq:dynamic"],
                              rounds=2, seed=5, peak_bisections=0, peak=None, json=None,
                              separate=False, xla_options="", unroll_layers=None)
    shown, regime = coserve.run_regime(None, args, log=lambda _: None)
    longer = sorted(c for c in calls if c[0] in ("temporal-seq:128", "temporal-seq:256",
                                                  "temporal-seq:512"))
    assert longer == [("temporal-seq:128", 4.0, 5), ("temporal-seq:128", 4.0, 6),
                      ("temporal-seq:256", 4.0, 5), ("temporal-seq:256", 4.0, 6)]
    assert regime["longer_periods"] == ["temporal-seq:128 @ 4", "temporal-seq:256 @ 4"]
    # Beside each added run, coserve again on its trace: once in the rounds, once per period.
    assert sorted(c for c in calls if c[:2] == ("coserve", 4.0)) == [("coserve", 4.0, 5)] * 3 \
        + [("coserve", 4.0, 6)] * 3
    assert calls.index(("temporal-seq:256", 4.0, 5)) + 1 == \
        calls.index(("coserve", 4.0, 5), calls.index(("temporal-seq:256", 4.0, 5)))
    beside = next(r for r in shown if r["mode"] == "coserve beside temporal-seq:256")
    assert beside["round_seeds"] == [5, 6] and beside["rate"] == 4.0
    lines = coserve.compare(shown, regime["rates"], 1000.0)
    at_4 = [line for line in lines if line.startswith("rate 4") and "temporal-seq" in line]
    assert "coserve run again beside temporal-seq:256" in at_4[0] and "= 3.00x it" in at_4[0]
    assert "3.00x best temporal-seq" in at_4[1] and "temporal-seq:256 at 96%" in at_4[1]
    assert "beside" in coserve.table(shown, 1000.0)
    # Where coserve itself kept less, a period keeping that much is enough.
    kept["coserve"] = 0.9
    calls.clear()
    _shown, regime = coserve.run_regime(None, args, log=lambda _: None)
    assert regime["longer_periods"] == ["temporal-seq:128 @ 4"]
    # --no-longer-periods: the modes asked for, and no more.
    args.longer_periods = False
    _shown, regime = coserve.run_regime(None, args, log=lambda _: None)
    assert regime["longer_periods"] == []


def test_a_given_peak_skips_the_search(monkeypatch, tmp_path):
    """``--peak``: the rates are fractions of the given peak, no probe runs, and the JSON
    written after each run (``save_partial``) says so, marked incomplete."""
    counts = dict(requests=10, refused=0, unfinished=0, steps=1, mixed_steps=0,
                  whole_samples=0)
    monkeypatch.setattr(coserve, "run_one", lambda model, mode, rate, args, seed=None: rec(
        mode, rate, 1.0, 0.0 if mode == "inference-only" else 100.0, seed=seed, **counts))
    monkeypatch.setattr(coserve, "find_peak", lambda *a, **k: pytest.fail("searched"))
    out = tmp_path / "partial.json"
    args = argparse.Namespace(tpot_ms=10.0, ttft_s=2.0, drain=1.0, duration=6.0, scale=0.25,
                              max_model_len=512, duration_given=True, rates=None, peak=8.0,
                              fractions=[0.5, 1.0], modes=["coserve"], rounds=1, seed=0,
                              peak_bisections=0, json=str(out), separate=True,
                              xla_options="", unroll_layers=None)
    _shown, regime = coserve.run_regime(None, args, log=lambda _: None)
    assert regime["peak_given"] and regime["peak_rate"] == 8.0
    assert regime["rates"] == [4.0, 8.0]
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["regime"]["peak_rate"] == 8.0
    assert {r["mode"] for r in partial["records"]} >= {"finetune-only", "coserve"}
    # --no-separate: the modes alone, without the inference-only rates the splits need.
    args.separate = False
    shown, _regime = coserve.run_regime(None, args, log=lambda _: None)
    assert {r["mode"] for r in shown} == {"finetune-only", "finetune-only (whole samples)",
                                          "coserve"}


def test_a_mode_is_an_engine_mode_or_a_coserve_variant():
    assert coserve.mode_error("temporal-seq:64") is None
    assert coserve.mode_error("coserve+no-slot-headroom") is None
    assert coserve.mode_error("coserve+no-slot-headroom+smallest-bucket") is None
    assert "coserve+no-slot-headroom" in coserve.mode_error("coserve+no-such-thing")
    # The engine itself refuses such a name, rather than running plain coserve under it.
    args = argparse.Namespace(ttft_s=2.0, tpot_ms=10.0)
    with pytest.raises(ValueError, match="coserve\\+no-such-thing"):
        coserve.engine_config("coserve+no-such-thing", args)
    assert coserve.engine_config("coserve+no-slot-headroom", args).scheduling.mode == "coserve"


def test_a_mistyped_mode_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit):
        coserve.main(["--quick", "--modes", "inference-only", "coserve+idle-sample"])
    err = capsys.readouterr().err
    assert "--modes: " in err and "coserve+idle-sample" in err


def test_the_attainment_check_counts_the_requests_that_missed():
    recs = [rec("coserve", 3.0, 0.875, 600.0, rate_fraction=0.5, requests=40),
            rec("inference-only", 3.0, 0.975, 0.0, requests=40)]
    lines = coserve.compare(recs, [3.0], 1000.0)
    assert ("rate 3 (0.5 of peak): inference-only 97.5% (1 of 40 missed), coserve 87.5% "
            "(5 of 40 missed) -> MISSED (>= 95%)") in lines


def test_the_8b_tier_path_builds_its_model_and_eight_step_programs():
    """``--tier tiny-8b-like`` (the CPU check of ``--tier llama3-8b``): random weights at the
    engine benchmark's shapes, with a tokenizer for the finetuning job, and one
    sequence-count and one page-width bucket."""
    import engine_throughput

    from coserve_jax import Engine

    model = coserve.tier_model("tiny-8b-like", None)
    assert model.config == engine_throughput.tiny_8b_like_config()
    assert model.tokenizer is not None
    args = argparse.Namespace(tier="tiny-8b-like", ttft_s=2.0, tpot_ms=50.0, max_model_len=512)
    coserve.fit_buckets_to_tier(args)
    buckets = Engine(model, coserve.engine_config("coserve", args)).buckets
    assert len(buckets) == 8
    assert {(b.num_seqs, b.num_pages) for b in buckets} == {(16, 32)}


def test_the_regime_line_gives_the_targets_multiple_before_and_after_the_runs():
    """A shared machine's speed moves, so a target in ms is a multiple of the decode TPOT
    only at the moment it was measured: the report gives it at both ends of the runs."""
    assert coserve.multiple_line(0.0094, 0.0031, 0.0047) == (
        "regime: the TPOT target 9.4 ms was 3.03x inference-only's decode TPOT before the "
        "runs (3.10 ms) and 2.00x the decode TPOT measured after them (4.70 ms)")
    assert coserve.multiple_line(0.0094, None, 0.0047) == (
        "regime: the TPOT target 9.4 ms was 2.00x the decode TPOT measured after them "
        "(4.70 ms)")


def test_measuring_the_decode_tpot_leaves_the_target_as_it_was(monkeypatch):
    seen = []

    def measure(model, args):
        seen.append(args.tpot_ms)
        return 0.005

    monkeypatch.setattr(coserve, "decode_tpot", measure)
    args = argparse.Namespace(tpot_ms=9.4)
    assert coserve.decode_tpot_now(None, args) == 0.005
    assert seen == [1e6] and args.tpot_ms == 9.4  # measured with no SLO, then restored


def test_a_runs_observations_are_kept_against_the_measured_table():
    """The latency model's own errors follow a lasting slow phase (each prediction is an
    average of what it observed); against the table as measured, the phase shows."""
    from coserve_jax.latency import LatencyModel

    latency = LatencyModel({"step": 0.010, "piece": 0.020})
    during = coserve.keep_against_measured(latency, dict(latency.times))
    for seconds in (0.010, 0.030, 0.030, 0.030):
        latency.observe("step", seconds)
    latency.observe("piece", 0.020)
    latency.observe("unmeasured", 0.5)  # no measured time: not kept
    assert during == pytest.approx([1.0, 3.0, 3.0, 3.0, 1.0])
    assert latency.times["step"] > 0.010  # the model itself still adapts
    key, error = latency.errors[-2]
    assert key == "step" and error < 3.0  # and its errors shrink as it does


def test_the_small_tier_runs_shorter_requests_unless_told_otherwise():
    assert coserve.length_scale(argparse.Namespace(tier="small", scale=None)) == 0.1
    assert coserve.length_scale(argparse.Namespace(tier="tiny", scale=None)) == 0.25
    assert coserve.length_scale(argparse.Namespace(tier="llama3-8b", scale=None)) == 0.25
    assert coserve.length_scale(argparse.Namespace(tier="small", scale=0.3)) == 0.3


def test_a_benchmarks_scratch_directory_is_gone_when_it_exits(tmp_path):
    """What a run keeps only while it runs (its latency model, a profile) is removed at
    exit: a run leaves nothing behind in the temporary directory."""
    import subprocess

    code = "import benchlib; print(benchlib.scratch_dir('coserve-bench-latency-'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True,
                         text=True, env=os.environ | {"TMPDIR": str(tmp_path)}, check=True)
    made = out.stdout.strip()
    assert os.path.dirname(made) == str(tmp_path)
    assert os.path.basename(made).startswith("coserve-bench-latency-")
    assert not os.path.exists(made) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_benchmark_stopped_by_a_signal_removes_its_scratch_directory(tmp_path, signum):
    """``kill`` or a closed terminal stops a run as Ctrl-C does: its scratch directory goes
    with it, and the exit status names the signal as a shell's does."""
    import signal
    import subprocess

    # The signal's default disposition, as a shell at a terminal starts a benchmark (under
    # nohup, as this suite may run, SIGHUP comes ignored, and scratch_dir leaves it so).
    code = (f"import signal; signal.signal(signal.{signum}, signal.SIG_DFL); "
            "import benchlib, time; print(benchlib.scratch_dir('coserve-bench-latency-'), "
            "flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=BENCH, stdout=subprocess.PIPE,
                            text=True, env=os.environ | {"TMPDIR": str(tmp_path)})
    made = proc.stdout.readline().strip()
    assert os.path.isdir(made)
    number = getattr(signal, signum)
    proc.send_signal(number)
    assert proc.wait(timeout=30) == 128 + number
    assert not os.path.exists(made) and os.listdir(tmp_path) == []


def test_a_benchmark_under_nohup_keeps_sighup_ignored(tmp_path):
    """``nohup`` starts a run with SIGHUP ignored so that it outlives its terminal: the
    scratch directory's exit on termination leaves that as it is."""
    import subprocess

    code = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); import benchlib; "
            "benchlib.scratch_dir('coserve-bench-latency-'); "
            "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, "
            "signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)")
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True,
                         text=True, env=os.environ | {"TMPDIR": str(tmp_path)}, check=True)
    assert out.stdout.split() == ["True", "True"]
    assert os.listdir(tmp_path) == []
