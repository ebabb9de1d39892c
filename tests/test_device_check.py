"""``bench/device_check.py --dry-run``: every part of the GPU session's one command runs on
CPU at tiny shapes (kernels in Pallas interpret mode), passes, and leaves one JSON and one
Markdown file per part; a part killed at its budget is recorded as timed out.

The dry run is one subprocess (its parts run two at a time: about 1-3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "bench", "device_check.py")
PARTS = ("env", "kernels", "engine", "decode", "coserve")
IMPORT_CHECK = "imports nothing the GPU image lacks"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(per-part directory, combined directory, stdout) of one full dry run."""
    out = tmp_path_factory.mktemp("device_check")
    combined = tmp_path_factory.mktemp("combined")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    run = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--jobs", "2", "--out", str(out),
         "--combined", str(combined)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return out, combined, run.stdout


def record(out, index: int, part: str) -> dict:
    with open(out / f"{index:02d}_{part}.json") as f:
        return json.load(f)


def test_one_json_and_one_markdown_per_part(dry_run):
    out, combined, stdout = dry_run
    expected = {f"{i:02d}_{p}.{ext}" for i, p in enumerate(PARTS, 1) for ext in ("json", "md")}
    assert set(os.listdir(out)) == expected | {"profile"}  # the decode part's traces
    for i, part in enumerate(PARTS, 1):
        r = record(out, i, part)
        assert (r["part"], r["index"], r["status"], r["dry_run"]) == (part, i, "ok", True)
        assert r["checks"] and all(c["passed"] for c in r["checks"]), r["checks"]
        assert any(c["name"] == IMPORT_CHECK for c in r["checks"])
        # Dry-run timings say nothing about a GPU: no target is marked met or missed.
        assert all(t["met"] is None for t in r["targets"])
        md = (out / f"{i:02d}_{part}.md").read_text()
        assert md.startswith(f"# {i:02d} {part}: ok")
    # Two files for a device tool that returns few: every part, in order.
    assert sorted(os.listdir(combined)) == ["device_check.json", "device_check.md"]
    with open(combined / "device_check.json") as f:
        assert [r["part"] for r in json.load(f)] == list(PARTS)
    # The summary table comes last (the device tool returns only the output's tail).
    tail = stdout.strip().splitlines()[-len(PARTS) - 2:]
    assert tail[0].startswith("| part | status |")
    assert [line.split("|")[1].strip() for line in tail[2:]] == [
        f"{i:02d} {p}" for i, p in enumerate(PARTS, 1)]
    assert all(line.split("|")[2].strip() == "ok" for line in tail[2:])


def test_environment_ceilings(dry_run):
    results = record(dry_run[0], 1, "env")["results"]
    assert results["backend"] == "cpu"
    assert results["versions"]["jax"] != "absent"
    assert results["project_path"] == REPO_ROOT  # this checkout, not an installed copy
    assert results["project_imports"] == dict.fromkeys(
        ("coserve_jax", "pallas_kernels", "coserve_jax.engine", "coserve_jax.step"), "ok")
    for key in ("copy_bandwidth_Bps", "matmul_flops"):
        assert math.isfinite(results[key]) and results[key] > 0


def test_kernels_match_references(dry_run):
    results = record(dry_run[0], 2, "kernels")["results"]
    rows = results["kernel_rows"]
    cases = {r["case"].split()[0] for r in rows}
    assert {"decode", "prefill", "mixed:", "causal", "LoRA"} <= cases
    checked = [r for r in rows if r["rel_err"] is not None]
    ours = [r for r in checked if r["impl"].startswith("ours")]
    assert len(ours) == len({r["case"] for r in rows})  # our kernel ran in every case
    for r in checked:  # float32 in interpret mode: every implementation agrees closely
        assert math.isfinite(r["rel_err"]) and r["rel_err"] < 1e-5, r
        assert r["ms"] > 0
    assert any(r["impl"] == "jax Pallas GPU paged_attention" and r["rel_err"] is not None
               for r in rows)
    lora = [r for r in ours if r["case"].startswith("LoRA 7 targets fwd+bwd")]
    assert lora, "the LoRA backward over all seven projections was not checked"


def test_engine_greedy_tokens_identical(dry_run):
    results = record(dry_run[0], 3, "engine")["results"]
    compared = {k: v for k, v in results.items() if isinstance(v, dict)}
    assert len(compared) == 2  # the embedded model, then the 8B-shape model
    for label, v in compared.items():
        assert v["kernels"] == "interpret" and v["identical"], label
        assert v["tokens"] == v["reference_tokens"]
        assert [len(t) for t in v["tokens"]] == [8] * 4


def test_decode_against_floors(dry_run):
    results = record(dry_run[0], 4, "decode")["results"]
    assert set(results["decode"]) == {"1", "4"}
    for v in [*results["decode"].values(), results["prefill"]]:
        assert 0 < v["floor_fraction"] < math.inf
    assert math.isfinite(results["lora"]["4"]["added_fraction"])
    # The same decode by an engine without adapter slots and by one whose layers are a
    # scan (the step's layers are a loop by default only on a GPU).
    assert set(results["variants"]) == {"no adapter slots", "layer scan",
                                        "layer scan, 8 adapters in use"}
    for v in results["variants"].values():
        assert v["batch"] == 4 and 0 < v["ratio_to_configured"] < math.inf
    # Each engine's base-model step profiled; the CPU backend has no device streams.
    # (every batch up to 64 by the configured engine: b=1 here besides the variants' b=4)
    assert set(results["profiles"]) == {"configured engine", "configured engine, b=1",
                                        "no adapter slots", "layer scan"}
    for summary in results["profiles"].values():
        assert summary["wall_per_step_s"] > 0 and summary["device_busy_per_step_s"] is None
        assert summary["host_planning_per_step_s"] > 0


def test_coserve_ran(dry_run):
    results = record(dry_run[0], 5, "coserve")["results"]
    records = results["records"]
    assert [r["mode"] for r in records] == ["coserve", "finetune-only"]
    assert records[0]["requests"] > 0 and 0 <= records[0]["slo_attainment"] <= 1
    assert records[1]["requests"] == 0 and records[1]["ft_tokens_per_s"] > 0
    assert results["coserve_share_of_finetune_only"] == pytest.approx(
        records[0]["ft_tokens_per_s"] / records[1]["ft_tokens_per_s"])


def import_bench(*names: str) -> list:
    """Modules of bench/ (a folder of scripts, not a package)."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.pop(0)


def test_record_appends_the_run_to_benchmarks(dry_run, tmp_path, monkeypatch):
    benchlib, device_check = import_bench("benchlib", "device_check")
    target = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(benchlib, "BENCHMARKS_MD", str(target))
    combined = dry_run[1] / "device_check.json"
    assert device_check.main(["--record", str(combined)]) == 0
    text = target.read_text()
    assert "## device_check: cpu (cpu)" in text and "- dry run: True" in text
    for i, part in enumerate(PARTS, 1):
        assert f"### {i:02d} {part}: ok" in text
    assert "#### Kernels vs references" in text and "#### Greedy tokens" in text


def test_a_part_killed_at_its_budget_is_recorded(tmp_path):
    """The parent kills a part at its budget and records it as timed out, with the output
    so far; a part given too little of the total is recorded as skipped."""
    (device_check,) = import_bench("device_check")
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, layers=None)
    # One second: the child is still importing jax when it is killed.
    r = device_check.run_part_process(args, "env", 1.0)
    assert r["status"] == "timed_out" and "killed at its 1 s budget" in r["error"]
    on_disk = json.loads((tmp_path / "01_env.json").read_text())
    assert on_disk["status"] == "timed_out"
    assert "timed_out" in (tmp_path / "01_env.md").read_text()

    skipped = tmp_path / "skipped"
    code = device_check.main(["--dry-run", "--parts", "kernels", "--total-s", "5", "--out",
                              str(skipped)])
    assert code == 1
    assert json.loads((skipped / "02_kernels.json").read_text())["status"] == "skipped"


def test_checked_bench_holds_kernels_to_a_float32_reference(tmp_path):
    """The GPU path of the kernel checks, on CPU: bfloat16 inputs are checked against the
    reference run on float32 copies; a kernel that leaves an element unwritten (NaN) or
    raises fails its check; comparison implementations never fail the part."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    device_records, device_parts = import_bench("device_records", "device_parts")
    rep = device_records.Report(str(tmp_path), "kernels", budget_s=60, dry_run=True)
    bench = device_parts.CheckedBench(rep, bound=2e-2, repeats=1, calls=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)

    def matmul(x, w):
        return x @ w

    def unwritten(x, w):
        return (x @ w).at[3, 5].set(jnp.nan)

    def raises(x, w):
        raise RuntimeError("no kernel here")

    bench.case("bf16 matmul", {
        "XLA reference": (jax.jit(matmul), (x, w)),
        "ours (same)": (jax.jit(matmul), (x, w)),
        "ours (unwritten)": (jax.jit(unwritten), (x, w)),
        "ours (raises)": (raises, (x, w)),
        "someone else's (raises)": (raises, (x, w)),
        "cuDNN": "not applicable here",
    })
    rows = {r["impl"]: r for r in bench.rows}
    # bf16 output rounding against the float32 product: small, but not zero.
    assert 1e-4 < rows["XLA reference"]["rel_err"] < 1e-2
    assert rows["ours (same)"]["rel_err"] == rows["XLA reference"]["rel_err"]
    assert rows["ours (unwritten)"]["rel_err"] == float("inf")
    assert rows["cuDNN"]["note"] == "not applicable here"
    results = {c["name"]: c["passed"] for c in rep.checks}
    assert results == {"bf16 matmul: XLA reference finite": True,
                       "bf16 matmul: ours (same)": True,
                       "bf16 matmul: ours (unwritten)": False,
                       "bf16 matmul: ours (raises) runs": False}
    assert rep.final_status() == "failed"
