"""Where an engine step's time goes: a ``jax.profiler`` trace of a few steps, summarised.

``profile_steps(step, steps, log_dir)`` traces ``steps`` calls of ``step()`` (an engine's
``step``, or any blocking call) with
jax's profiler (``create_perfetto_trace``, so the trace is also a plain JSON file that
needs no TensorBoard plugin to read), and ``summarize(trace)`` splits the wall time
into the time a device was busy (the union of its ops' intervals, so overlapping streams
count once), the ops that took it, and what is left: the host's planning, dispatch and
read-back, and launch gaps. On a GPU the device rows are its streams; on the CPU backend
there are none (XLA's ops run on host threads), and the summary says so.

    from step_profile import profile_steps
    summary = profile_steps(engine.step, 5, "/tmp/prof")   # the engine mid-decode
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time
from collections.abc import Callable


def load_trace(log_dir: str) -> dict:
    """The newest ``perfetto_trace.json.gz`` under ``log_dir``."""
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f)


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def summarize(trace: dict, wall_s: float, steps: int, top: int = 12) -> dict:
    """Per-step device busy time, the ``top`` device ops by time, and the rest of the wall.

    Device events are those of processes whose name holds ``/device:`` (jax's profiler
    names GPU and TPU streams so); everything else is host activity.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "")
             for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "/device:" in name}
    intervals, by_op, counts = [], collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        intervals.append((start, start + dur))
        by_op[e["name"]] += dur
        counts[e["name"]] += 1
    busy_s = _busy_us(intervals) * 1e-6
    per_step = wall_s / steps
    return {
        "steps": steps,
        "wall_per_step_s": per_step,
        "processes": sorted(names.values()),
        "device_processes": sorted(names[p] for p in device_pids),
        "device_busy_per_step_s": busy_s / steps if device_pids else None,
        "device_ops_per_step": len(intervals) / steps,
        # Device-to-device copies (XLA's memcpy kernels): a step that reads its weights
        # in place has almost none.
        "memcpy_per_step_s": (sum(us for name, us in by_op.items() if "memcpy" in name)
                              * 1e-6 / steps if device_pids else None),
        "not_device_busy_per_step_s": per_step - busy_s / steps if device_pids else None,
        "top_ops": [{"name": name, "per_step_s": us * 1e-6 / steps,
                     "calls_per_step": counts[name] / steps}
                    for name, us in by_op.most_common(top)],
    }


def profile_steps(step: Callable[[], object], steps: int, log_dir: str) -> dict:
    """Traces ``steps`` calls of ``step`` (each must block) and summarises them."""
    import jax

    os.makedirs(log_dir, exist_ok=True)
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    finally:
        jax.profiler.stop_trace()
    return summarize(load_trace(log_dir), wall, steps)
