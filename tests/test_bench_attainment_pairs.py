"""``bench/attainment_pairs.py`` without an engine: every trace runs both modes, in
alternating order, and the summary compares them trace by trace."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
pairs = pytest.importorskip("attainment_pairs")


def fake_run(attainment, slowdown=None):
    """A ``run_one`` whose attainment is ``attainment[mode][seed]``, 20 requests a run
    (``slowdown[mode][seed]``: its ``machine_slowdown``, where given)."""
    calls = []

    def run(model, mode, rate, args, seed):
        calls.append((seed, mode))
        speed = {} if slowdown is None else {"machine_slowdown": slowdown[mode][seed]}
        return speed | {"mode": mode, "rate": rate, "seed": seed, "requests": 20,
                        "refused": 0, "unfinished": 0, "slo_attainment": attainment[mode][seed],
                        "ft_tokens_per_s": 0.0 if mode == "inference-only" else 100.0,
                        "steps": 1, "mixed_steps": 0, "whole_samples": 0}

    return run, calls


def test_every_trace_runs_both_modes_in_alternating_order():
    run, calls = fake_run({m: [1.0] * 4 for m in pairs.MODES})
    args = argparse.Namespace(traces=4, seed=0)
    recs = pairs.run_pairs(None, 6.0, args, run=run, log=lambda _: None)
    assert calls == [(0, "inference-only"), (0, "coserve"), (1, "coserve"),
                     (1, "inference-only"), (2, "inference-only"), (2, "coserve"),
                     (3, "coserve"), (3, "inference-only")]
    assert len(recs) == 8


def test_the_summary_counts_traces_each_way_and_bounds_the_difference():
    run, _ = fake_run({"inference-only": [1.0, 0.9, 0.8, 1.0],
                       "coserve": [1.0, 0.95, 0.7, 0.9]})
    recs = pairs.run_pairs(None, 6.0, argparse.Namespace(traces=4, seed=0), run=run,
                           log=lambda _: None)
    s = pairs.paired_summary(recs)
    assert (s["better"], s["same"], s["worse"]) == (1, 1, 2)
    assert s["coserve"]["slo_attainment"] == pytest.approx(3.55 / 4)
    assert s["inference-only"]["slo_attainment"] == pytest.approx(3.7 / 4)
    assert s["difference"] == pytest.approx(-0.15 / 4)
    lo, hi = s["interval"]
    assert lo <= s["difference"] <= hi
    assert lo >= -0.1 - 1e-9 and hi <= 0.05 + 1e-9  # within the widest per-trace differences
    assert "worse on 2" in pairs.describe(6.0, s)


def test_the_machines_speed_is_printed_with_each_run_and_its_range_with_the_summary():
    """A pair whose runs found the machine at different speeds compares the machine too:
    each run's line and the summary say how fast it was."""
    run, _ = fake_run({m: [1.0, 0.9] for m in pairs.MODES},
                      slowdown={"inference-only": [1.0, 0.9], "coserve": [1.3, 0.6]})
    lines = []
    recs = pairs.run_pairs(None, 6.0, argparse.Namespace(traces=2, seed=0), run=run,
                           log=lines.append)
    assert lines[1].endswith("padding steps 1.30x their predicted time")  # trace 0, coserve
    text = pairs.describe(6.0, pairs.paired_summary(recs))
    assert text.endswith("; machine speed: before each run, padding steps took 0.60-1.30x "
                         "their time when the latency model was measured; past 1.15x "
                         "(figures from a slower machine than the rest): coserve @ 6 (1.30x); "
                         "below 0.87x (a latency model measured on a slower machine than the "
                         "run's: it priced the work dear): coserve @ 6 (0.60x)")
    run, _ = fake_run({m: [1.0] for m in pairs.MODES})  # runs that did not measure it
    recs = pairs.run_pairs(None, 6.0, argparse.Namespace(traces=1, seed=0), run=run,
                           log=lines.append)
    assert lines[-1].endswith("tok/s")
    assert pairs.describe(6.0, pairs.paired_summary(recs)).endswith("tok/s")


def test_a_trace_run_on_a_moving_machine_is_run_again():
    """With ``matched_speed``, a trace whose runs found the machine's speed (before and after
    each) more than that share apart runs again, up to ``retries`` times; the last try is
    kept, marked unmatched where it still moved, and the summary counts both."""
    speeds = iter([(1.0, 1.5), (1.0, 1.0),   # trace 0: moved 1.5x, run again
                   (1.0, 1.1), (1.05, 1.0),  # then within 20%: kept
                   (1.0, 1.0), (1.3, 1.0),   # trace 1: moved three times, kept unmatched
                   (1.0, 1.0), (1.3, 1.0),
                   (1.0, 1.0), (1.3, 1.0)])
    calls = []

    def run(model, mode, rate, args, seed):
        calls.append((seed, mode))
        before, after = next(speeds)
        return {"mode": mode, "rate": rate, "seed": seed, "requests": 20, "refused": 0,
                "unfinished": 0, "slo_attainment": 1.0, "ft_tokens_per_s": 0.0, "steps": 1,
                "mixed_steps": 0, "whole_samples": 0, "machine_slowdown": before,
                "machine_slowdown_after": after}

    lines = []
    args = argparse.Namespace(traces=2, seed=0, matched_speed=0.2, retries=2)
    recs = pairs.run_pairs(None, 6.0, args, run=run, log=lines.append)
    assert [seed for seed, _ in calls] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert [(r["seed"], r["matched"], r["tries"]) for r in recs] == [
        (0, True, 2), (0, True, 2), (1, False, 3), (1, False, 3)]
    assert "trace 0: the machine's speed moved 1.50x across its runs" in lines[2]
    assert lines[-1].endswith("kept unmatched")
    assert lines[0].endswith("1.00x their predicted time before it, 1.50x after")
    assert ("; 3 traces run again for a machine whose speed moved across their runs or whose "
            "CPU time other guests took, 1 kept unmatched;"
            ) in pairs.describe(6.0, pairs.paired_summary(recs))
    assert pairs.speed_spread([{"machine_slowdown": None}]) is None


def test_a_trace_one_of_whose_runs_lost_cpu_time_to_other_guests_is_run_again():
    """A run that lost more than ``max_steal`` of the host's CPU time (its hypervisor gave it
    to other guests) spoils its trace's pair as a moving machine does."""
    steals = iter([0.01, 0.20,    # trace 0: coserve's run robbed, run again
                   0.00, 0.04])   # within 5%: kept
    calls = []

    def run(model, mode, rate, args, seed):
        calls.append(seed)
        return {"mode": mode, "rate": rate, "seed": seed, "requests": 20, "refused": 0,
                "unfinished": 0, "slo_attainment": 1.0, "ft_tokens_per_s": 0.0, "steps": 1,
                "mixed_steps": 0, "whole_samples": 0, "machine_slowdown": 1.0,
                "machine_slowdown_after": 1.0, "steal_share": next(steals)}

    lines = []
    args = argparse.Namespace(traces=1, seed=0, matched_speed=0.2, retries=2, max_steal=0.05)
    recs = pairs.run_pairs(None, 6.0, args, run=run, log=lines.append)
    assert calls == [0, 0, 0, 0]
    assert [(r["matched"], r["tries"]) for r in recs] == [(True, 2), (True, 2)]
    assert lines[2] == ("  trace 0: a run lost 20.0% of the host's CPU time (past --max-steal)"
                        ", run again")


def test_a_runs_line_gives_its_share_of_steps_in_a_slow_phase():
    rec = {"machine_slowdown": 1.0, "machine_slowdown_after": 1.1, "slow_step_share": 0.25}
    assert pairs._speed(rec) == (", padding steps 1.00x their predicted time before it, 1.10x "
                                 "after; 25% of its steps past 1.5x their measured time")
    assert pairs._speed(rec | {"steal_share": 0.031}).endswith(
        "measured time; host CPU time stolen 3.1%")


def test_the_steal_share_is_the_stolen_part_of_the_cpu_time_between_two_readings():
    from benchlib import cpu_steal, steal_share

    assert steal_share((1000, 10), (2000, 60)) == pytest.approx(0.05)
    assert steal_share(None, (2000, 60)) is None
    assert steal_share((1000, 10), (1000, 10)) is None
    reading = cpu_steal()
    if reading is not None:  # (Linux)
        total, stolen = reading
        assert 0 <= stolen <= total


def test_pairs_against_the_smallest_bucket_compare_each_engine_on_its_own():
    """With ``--against-smallest-bucket`` four modes share each trace; each engine's pair is
    summarised apart, under the plain mode names."""
    smallest = pairs.coserve.SMALLEST_BUCKET
    modes = pairs.MODES + tuple(m + smallest for m in pairs.MODES)
    attainment = {"inference-only": [1.0] * 2, "coserve": [1.0] * 2,
                  "inference-only" + smallest: [1.0] * 2, "coserve" + smallest: [0.5, 1.0]}
    run, calls = fake_run(attainment)
    recs = pairs.run_pairs(None, 3.0, argparse.Namespace(traces=2, seed=0), run=run,
                           log=lambda _: None, modes=modes)
    assert [m for s, m in calls if s == 1] == list(modes[1:] + modes[:1])  # rotated
    cheapest = pairs.paired_summary(pairs.variant_records(recs, ""))
    old = pairs.paired_summary(pairs.variant_records(recs, smallest))
    assert (cheapest["worse"], cheapest["coserve"]["slo_attainment"]) == (0, 1.0)
    assert (old["worse"], old["coserve"]["slo_attainment"]) == (1, 0.75)


def test_rivals_run_on_every_trace_and_coserves_finetuning_is_compared_with_each():
    """``--rivals``: a rival mode shares every trace; the summary pools each mode's tokens over
    its seconds and bounds the ratio over traces."""
    rival = "temporal-seq:dynamic"
    modes = (*pairs.MODES, rival)
    base, calls = fake_run({"inference-only": [1.0] * 3, "coserve": [1.0, 1.0, 0.9],
                            rival: [0.9, 1.0, 0.95]})
    finetuning = {("coserve", 0): 300.0, ("coserve", 1): 100.0, ("coserve", 2): 200.0,
                  (rival, 0): 100.0, (rival, 1): 200.0, (rival, 2): 100.0}

    def run(model, mode, rate, args, seed):
        rec = base(model, mode, rate, args, seed)
        return rec | {"duration_s": 6.0 + seed,
                      "ft_tokens_per_s": finetuning.get((mode, seed), 0.0)}

    recs = pairs.run_pairs(None, 5.0, argparse.Namespace(traces=3, seed=0), run=run,
                           log=lambda _: None, modes=modes)
    assert sorted(calls) == sorted((s, m) for s in range(3) for m in modes)
    s = pairs.finetune_summary(recs, rival)
    made = {"coserve": 300 * 6 + 100 * 7 + 200 * 8, rival: 100 * 6 + 200 * 7 + 100 * 8}
    assert s["ratio"] == pytest.approx(made["coserve"] / made[rival])
    assert s["coserve"]["ft_tokens_per_s"] == pytest.approx(made["coserve"] / 21)
    assert s[rival]["slo_attainment"] == pytest.approx(2.85 / 3)
    lo, hi = s["interval"]
    assert 0.5 - 1e-9 <= lo <= s["ratio"] <= hi <= 3.0 + 1e-9  # within the per-trace ratios
    # More on traces 0 and 2; on trace 2 at a lower attainment than the rival's.
    assert (s["more"], s["more_at_attainment"]) == (2, 1)
    assert f"{s['ratio']:.2f}x" in pairs.describe_finetuning(5.0, s)
    # The inference-only pair is summarised as before, the rival left out of it.
    assert pairs.paired_summary(recs)["traces"] == 3


def test_a_rival_that_is_no_mode_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit):
        pairs.main(["--rates", "5", "--rivals", "temporal-seq:often"])
    assert "temporal-seq:often" in capsys.readouterr().err


@pytest.mark.parametrize("argv, error", [
    (["--rates", "5", "--fractions", "0.5"], "--fractions goes with --find-peak"),
    (["--find-peak", "--fractions", "0"], "--fractions: each must be in (0, 4]"),
])
def test_fractions_of_the_peak_are_checked_before_any_run(capsys, argv, error):
    with pytest.raises(SystemExit):
        pairs.main(argv)
    assert error in capsys.readouterr().err


def test_the_regime_names_the_fractions_of_the_peak_found():
    assert pairs.found_peak_line([1.0], 8.0) == " (rate: the peak found, 8 req/s)"
    assert (pairs.found_peak_line([0.5, 1.0], 8.0)
            == " (rates: 0.5, 1 of the peak found, 8 req/s)")
