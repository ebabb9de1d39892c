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
