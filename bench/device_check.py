"""Everything a lent GPU must check, in one command: docs/device_check.md says how to run it.

Five parts, in order, each in its own process under its own time budget, each writing
``<out>/NN_<part>.json`` and ``<out>/NN_<part>.md`` as soon as it has results (and again
when it ends), so a part that fails, crashes or runs out of time costs only itself:

1. ``env``: device, driver, jax and library versions, which optional jax kernels import;
   measured copy bandwidth and matmul rate (the ceilings later parts are held against);
2. ``kernels``: every compiled kernel against its reference in bfloat16 at Llama-3.1-8B
   shapes on the co-serving step's mixes (decode rows, prefill chunks, finetuning windows;
   GQA 4; LoRA of rank 16 on all 7 targets with 8 adapters, some tokens without one):
   relative error against a float32 reference, time against the XLA reference,
   ``jax.nn.dot_product_attention`` (cuDNN) where it applies and jax's own Pallas GPU
   decode ``paged_attention``;
3. ``engine``: the engine end to end with the kernels against the references: identical
   greedy tokens (float32, "highest" matmul precision, so that rounding cannot break a
   near tie) on the embedded model, then on random-weight Llama-3.1-8B shapes;
4. ``decode``: decode step time at Llama-3.1-8B shapes (bfloat16), batch 1, 16, 64 and
   256, against the memory floor; prefill against the matmul floor; what LoRA on 7
   targets with 8 adapters of rank 16 adds to a decode step;
5. ``coserve``: a short ``bench/coserve.py`` run at Llama-3.1-8B shapes, if time is left.

``--dry-run`` runs every part at tiny shapes on CPU with the kernels in Pallas interpret
mode (float32), so every code path a GPU session runs has run before
(``tests/test_device_check.py`` does this in the default suite). A summary table is
printed last. ``--combined DIR`` also keeps ``DIR/device_check.json`` and
``DIR/device_check.md`` (all parts so far, rewritten after each part): two files, for a
device tool that returns few files.

    python bench/device_check.py --dry-run --out /tmp/dc
    python bench/device_check.py --out /tmp/dc --combined "$OUT"       # on the GPU
    python bench/device_check.py --parts env kernels --budget-s kernels=300

This process only orchestrates and imports no jax; each part runs in a child process
(``--child PART``: ``bench/device_parts.py``) that it kills at the part's budget. The
records, their files and the summary table are ``bench/device_records.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _path in (REPO_ROOT, BENCH_DIR):  # run as a script from anywhere
    if _path not in sys.path:
        sys.path.insert(0, _path)

# bench/ is on sys.path from here on.
from device_records import (  # noqa: E402
    PARTS,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    STATUS_TIMED_OUT,
    load_records,
    part_index,
    read_record,
    render_markdown,
    summary_table,
    write_record,
)

# Seconds per part. On a device they add up to the total cap of 570 s, so one `run`
# with timeout_s=600 ends with time to spare and a 15-minute lease keeps room for a
# shorter second call (docs/device_check.md). On an H200, 2026-12-04: env took 10 s, the
# kernels 130 s without finishing the last case, the engine 63 s, co-serving 128 s.
# Dry-run budgets only catch hangs: a loaded 2-core machine runs the whole dry run in
# 1-3 minutes.
GPU_BUDGET_S = {"env": 30, "kernels": 160, "engine": 80, "decode": 170, "coserve": 130}
DRY_BUDGET_S = {"env": 120, "kernels": 300, "engine": 300, "decode": 300, "coserve": 400}
GPU_TOTAL_S = 570
MIN_PART_S = 20  # a part is not started with less time than this left


# ================================================================ orchestration (parent)


def run_part_process(args: argparse.Namespace, part: str, budget_s: float) -> dict:
    """Runs one part in a child process, echoing its output, killing it at the budget."""
    index = part_index(part)
    command = [sys.executable, os.path.abspath(__file__), "--child", part, "--out", args.out,
               "--child-budget-s", f"{budget_s:.1f}"]
    if args.dry_run:
        command.append("--dry-run")
    if args.layers:
        command += ["--layers", str(args.layers)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    tail: collections.deque[str] = collections.deque(maxlen=80)
    start = time.monotonic()
    # A new session, so the kill at the budget takes the child and anything it started.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=REPO_ROOT, start_new_session=True)

    def pump():
        for line in child.stdout:
            tail.append(line)
            print(f"[{index:02d} {part}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        child.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    reader.join(timeout=10)
    record = read_record(args.out, part) or {
        "part": part, "index": index, "dry_run": args.dry_run, "budget_s": budget_s,
        "checks": [], "targets": [], "results": {}, "summary": "", "error": None}
    record["elapsed_s"] = time.monotonic() - start
    if timed_out:
        record["status"] = STATUS_TIMED_OUT
        record["error"] = (record.get("error") or "") + f"killed at its {budget_s:.0f} s budget"
    elif child.returncode != 0 or record.get("status") in (None, "running"):
        record["status"] = STATUS_FAILED
        record["error"] = (record.get("error") or "") + (
            f"the part's process exited with code {child.returncode} without a final record")
    if record["status"] != STATUS_OK:
        record["output_tail"] = "".join(tail)[-6000:]
    write_record(args.out, record)
    return record


def write_combined(directory: str, records: list[dict]) -> None:
    """All parts so far in one JSON and one Markdown file (rewritten after every part)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "device_check.json.tmp"), "w") as f:
        json.dump(records, f, indent=1, default=str)
    os.replace(os.path.join(directory, "device_check.json.tmp"),
               os.path.join(directory, "device_check.json"))
    text = summary_table(records) + "\n\n" + "\n".join(render_markdown(r) for r in records)
    with open(os.path.join(directory, "device_check.md.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(directory, "device_check.md.tmp"),
               os.path.join(directory, "device_check.md"))


def parse_budgets(items: list[str], defaults: dict[str, float]) -> dict[str, float]:
    budgets = dict(defaults)
    for item in items:
        part, _, value = item.partition("=")
        if part not in PARTS or not value:
            raise SystemExit(f"--budget-s wants PART=SECONDS with PART in {PARTS}, got {item!r}")
        budgets[part] = float(value)
    return budgets


def orchestrate(args: argparse.Namespace) -> int:
    budgets = parse_budgets(args.budget_s, DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    total = args.total_s if args.total_s is not None else (
        sum(budgets.values()) if args.dry_run else GPU_TOTAL_S)
    os.makedirs(args.out, exist_ok=True)
    parts = [p for p in PARTS if p in args.parts]
    if args.jobs > 1:
        # Concurrent parts (a dry run's shortcut on a CPU: timings mean nothing there) start
        # longest first; a part that finds no earlier record to read measures for itself.
        parts.sort(key=lambda p: -budgets[p])
    print(f"device check -> {args.out} ({'dry run, CPU' if args.dry_run else 'device'}; "
          f"parts {', '.join(parts)}; {args.jobs} at a time; at most {total:.0f} s)",
          flush=True)
    end = time.monotonic() + total
    records: dict[str, dict] = {}
    lock = threading.Lock()
    queue = collections.deque(parts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                part = queue.popleft()
            budget = min(budgets[part], end - time.monotonic())
            if budget < MIN_PART_S:
                record = {"part": part, "index": part_index(part), "status": STATUS_SKIPPED,
                          "dry_run": args.dry_run, "budget_s": max(budget, 0.0),
                          "elapsed_s": 0.0, "summary": "", "checks": [], "targets": [],
                          "results": {},
                          "error": f"not started: {max(budget, 0):.0f} s of the total left"}
                write_record(args.out, record)
            else:
                record = run_part_process(args, part, budget)
            with lock:
                records[part] = record
                if args.combined:
                    write_combined(args.combined, [records[p] for p in PARTS if p in records])

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [records[p] for p in PARTS if p in records]
    print("\n" + summary_table(done), flush=True)
    return 0 if all(r["status"] == STATUS_OK for r in done) else 1


def record_benchmarks(path: str) -> int:
    """Appends a run's figures (fetched from the device) to BENCHMARKS.md, with the device
    and the date of the run."""
    import benchlib

    records = load_records(path)
    if not records:
        raise SystemExit(f"no device-check records in {path}")
    env = next((r for r in records if r["part"] == "env"), {}).get("results", {})
    versions = env.get("versions", {})
    device = ", ".join(env.get("devices", [])) or records[0].get("platform", "?")
    info = {
        "device": device + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else ""),
        "run at": records[0].get("written_at", "?") + " (UTC, when its first part ended)",
        "versions": ", ".join(f"{k} {versions[k]}" for k in
                              ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin",
                               "flax", "optax") if versions.get(k, "absent") != "absent"),
        # The device's copy of the tree may carry no git metadata: the checkout that
        # records the run (the one that was sent) says which commit it was.
        "coserve_jax": f"{env.get('library_revision', '?')} on the device; recorded from "
                       f"{benchlib.library_revision()}",
        "dry run": str(any(r.get("dry_run") for r in records)),
    }
    body = [summary_table(records)]
    for r in records:
        body.append(f"### {r['index']:02d} {r['part']}: {r['status']}")
        failed = [c for c in r.get("checks", []) if not c["passed"]]
        body += [f"- FAILED {c['name']}: {c['detail']}" for c in failed]
        body += [f"- target {t['name']}: {'met' if t['met'] else 'MISSED'} ({t['detail']})"
                 for t in r.get("targets", []) if t["met"] is not None]
        if r.get("body_md"):
            # The part's own tables, one heading level down.
            body.append(re.sub(r"^## ", "#### ", r["body_md"], flags=re.MULTILINE))
        if r.get("error") and r["status"] != STATUS_OK:
            body.append(f"- error: {r['error'].strip().splitlines()[-1]}")
    benchlib.record(f"device_check: {device}", info, "\n\n".join(body))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="every part at tiny shapes on CPU, kernels in Pallas interpret mode")
    p.add_argument("--out", help="directory of the per-part files (default: "
                                 "bench/out/device_check/<UTC timestamp>)")
    p.add_argument("--combined", help="also keep device_check.json and device_check.md here")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget-s", nargs="*", default=[], metavar="PART=SECONDS",
                   help="override a part's time budget")
    p.add_argument("--total-s", type=float,
                   help=f"cap on all parts together (default {GPU_TOTAL_S} s on a device)")
    p.add_argument("--jobs", type=int, default=1,
                   help="parts run at once (a dry run's shortcut; keep 1 on a device, where "
                        "parts would disturb each other's timings)")
    p.add_argument("--layers", type=int,
                   help="layers of the 8B-shape model in parts 3-5 (default 32; 2 dry)")
    p.add_argument("--record", metavar="PATH",
                   help="append the figures of a finished run (its combined device_check.json "
                        "or its --out directory) to BENCHMARKS.md, and do nothing else")
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--child-budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.record:
        return record_benchmarks(args.record)
    if args.jobs > 1 and not args.dry_run:
        # Each part's process takes most of the device's memory, and timings would mix.
        p.error("--jobs > 1 is for --dry-run only: on a device the parts run one at a time")
    if args.out is None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = os.path.join(REPO_ROOT, "bench", "out", "device_check", stamp)
    if args.child:  # a part's own process: the only place jax is imported
        import device_parts

        return device_parts.run_part(args.child, args.out, args.child_budget_s, args.dry_run,
                                     args.layers)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
