"""The GPU-session diagnostics' code paths on CPU: ``bench/step_profile.py``'s summary of a
trace (device busy time as the union of stream intervals) and ``bench/layer_weights.py``'s
three ways of reading a layer's weights, which must compute the same function."""

from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
step_profile = pytest.importorskip("step_profile")


def test_device_busy_time_counts_overlapping_streams_once():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}}]
    ops = [  # two streams overlapping for 5 us, then a gap, over 2 steps
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 10.0, "name": "memcpy128"},
        {"ph": "X", "pid": 1, "tid": 2, "ts": 5.0, "dur": 10.0, "name": "gemm"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 30.0, "dur": 10.0, "name": "memcpy128"},
        {"ph": "X", "pid": 7, "tid": 3, "ts": 0.0, "dur": 100.0, "name": "host work"},
    ]
    out = step_profile.summarize({"traceEvents": meta + ops}, wall_s=100e-6, steps=2)
    assert out["device_processes"] == ["/device:GPU:0"]
    assert out["device_busy_per_step_s"] == pytest.approx(25e-6 / 2)
    assert out["not_device_busy_per_step_s"] == pytest.approx(50e-6 - 12.5e-6)
    assert out["device_ops_per_step"] == 1.5
    assert out["memcpy_per_step_s"] == pytest.approx(10e-6)
    top = {op["name"]: op for op in out["top_ops"]}
    assert top["memcpy128"]["per_step_s"] == pytest.approx(10e-6)
    assert top["memcpy128"]["calls_per_step"] == 1.0
    assert "host work" not in top


def test_without_device_streams_busy_time_is_not_guessed():
    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}}]
    ops = [{"ph": "X", "pid": 7, "tid": 3, "ts": 0.0, "dur": 100.0, "name": "host work"}]
    out = step_profile.summarize({"traceEvents": meta + ops}, wall_s=1e-3, steps=1)
    assert out["device_busy_per_step_s"] is None and out["top_ops"] == []


def test_the_three_ways_of_reading_layer_weights_compute_the_same(tmp_path):
    layer_weights = pytest.importorskip("layer_weights")
    rows = layer_weights.main(["--tiny", "--repeats", "1", "--json", str(tmp_path / "lw.json")])
    assert [r["variant"] for r in rows] == list(layer_weights.VARIANTS)
    for row in rows:  # float32 on CPU: the same arithmetic, whatever XLA's GPU options say
        assert "error" not in row, row
        assert row["rel_err_vs_first"] < 1e-6, row
        assert row["median_s"] > 0 and row["weight_bytes"] > 0
        assert row["memcpy_s"] is None  # no device streams on the CPU backend
    assert len((tmp_path / "lw.json").read_text().splitlines()) == len(rows)
    # --pick: the flags of the fastest variant an engine can be configured as; none when
    # nothing beats the scan by 5%, and never a variant that computes something else.
    flags = layer_weights.engine_flags
    row = {"rel_err_vs_first": 0.0}
    timed = [{"variant": "scan", "median_s": 12.0, **row},
             {"variant": "loop-slices", "median_s": 4.4, **row},
             {"variant": "loop-arrays", "median_s": 4.0, **row},  # no engine reads this way
             {"variant": "scan, cuBLAS", "median_s": 5.8, **row},
             {"variant": "scan, no memcpy rewrite", "error": "XlaRuntimeError: ..."}]
    assert flags(timed) == "--unroll-layers"
    timed[1] = {**timed[1], "rel_err_vs_first": 0.5}
    assert flags(timed) == ("--no-unroll-layers "
                            "--xla-options=xla_gpu_enable_triton_gemm=false")
    assert flags([timed[0], {**timed[3], "median_s": 11.8}]) == ""
    assert flags(timed[1:]) == ""  # the scan was not measured
