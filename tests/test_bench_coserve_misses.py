"""``bench/coserve_misses.py``'s reading of the latency model's errors, without an engine:
whether the errors of the steps just before foretell an observation's error."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from coserve_jax.latency import LatencyModel

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
misses = pytest.importorskip("coserve_misses")


def observations(speed: np.ndarray, noise: float, seed: int = 0) -> list:
    """``LatencyModel.errors`` of steps at the machine's ``speed`` (observed / predicted,
    one per step) times lognormal noise, and of a whole sample every tenth step at the same
    speed."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(speed):
        out.append(("t16-s4-w8-infer", s * rng.lognormal(0, noise)))
        if i % 10 == 0:
            out.append(("sample-n64", s * rng.lognormal(0, noise)))
    return out


def test_errors_that_follow_the_machine_are_foretold_by_the_steps_before():
    # The machine runs at 1.0, then 1.4x slower, then 1.0 again, for 300 steps each.
    speed = np.repeat([1.0, 1.4, 1.0], 300)
    memory = misses.error_memory(observations(speed, noise=0.02))
    sample = memory["sample"]
    assert sample["p90"] > 1.3  # the slow phase's overruns
    assert sample["corr"] > 0.9
    assert sample["p90_adjusted"] < 1.1  # scaled by the recent steps, hardly any overrun left
    assert memory["step"]["n"] == 900 - misses.CONTEXT_STEPS


def test_noise_around_a_steady_machine_is_not_foretold():
    memory = misses.error_memory(observations(np.ones(900), noise=0.15))
    for kind in ("step", "sample"):
        m = memory[kind]
        assert abs(m["corr"]) < 0.2
        assert m["p90"] > 1.15
        # Scaling by the recent steps' median error removes nothing.
        assert m["p90_adjusted"] == pytest.approx(m["p90"], rel=0.05)


def test_unmeasured_shapes_and_other_units_are_left_out():
    latency = LatencyModel({"t16-s4-w8-infer": 0.01, "piece-n64-k1": 0.01})
    for _ in range(misses.CONTEXT_STEPS):
        latency.observe("t16-s4-w8-infer", 0.01)
    latency.observe("sample-n128", 0.2)  # never measured: its first observation is no error
    latency.observe("piece-n64-k1", 0.03)  # a backward piece: neither kind
    latency.observe("t16-s4-w8-infer", 0.02)
    memory = misses.error_memory(latency.errors)
    assert "sample" not in memory
    assert memory["step"]["n"] == 1 and memory["step"]["p50"] == pytest.approx(2.0)
    assert np.isnan(memory["step"]["corr"])  # one pair: no correlation to speak of
    assert "steps: observed / predicted p50 2.00" in misses.memory_line(memory)
    assert misses.memory_line({}) == "no predicted unit observed"
