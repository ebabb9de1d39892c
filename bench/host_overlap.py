"""Host overlap: the share of each iteration the host adds on top of the device's work,
synchronous loop vs overlapped loop (``SchedulingConfig.overlap_host``), on the embedded
model.

For each scenario (steady decode at batch 1 and 16, and co-serving: 8 decoding requests
beside a finetuning job) and each loop, the engine runs to a steady state; then over a
window of iterations it records every command its runner executes (the runner's
``mirror`` hook, the same door the multi-host leader uses) and the window's wall time.
The same commands are then replayed back to back on the runner, with nothing else on
the host: that is the device's own time for the window's work (its programs, dispatched
in the same order). ``host share = 1 - replay / wall``: the part of each iteration the
device waits for the host. The two loops run short interleaved windows in one process,
each replayed right after it, so the machine's drift hits both sides of every ratio
alike; the figures are ratios on whatever machine runs it. The host's own CPU time per
iteration (the engine thread's) is reported beside them. Greedy outputs of the two loops
are compared too.

On a CPU the "device" is the same cores as the host: XLA's threads and the host's Python
share them, so host work hidden behind a step still slows it. ``--split-cores`` gives
XLA's threads the last core and the host thread the others (as a GPU and its host have
their own), which measures the overlap itself apart from that contention.

    python bench/host_overlap.py            # appends to BENCHMARKS.md
    python bench/host_overlap.py --split-cores
    python bench/host_overlap.py --quick --no-record
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import coserve_jax as cj
from bench.benchlib import markdown_table, record
from bench.engine_throughput import machine_info
from coserve_jax.finetune.data import DataConfig, from_records, synthetic_task

CONFIG = dict(page_size=16, num_pages=512, max_num_seqs=16, max_num_batched_tokens=64,
              min_token_bucket=16, max_model_len=1024, max_train_seqs=2, max_train_len=128,
              train_window=32, backward_pieces_per_step=2, default_tpot_s=10.0,
              default_ttft_s=100.0, admission_control=False)
SCENARIOS = {"decode batch 1": (1, False), "decode batch 16": (16, False),
             "co-serving (8 decodes + finetuning)": (8, True)}


def engine_for(model, requests: int, finetune: bool, overlap: bool, warm: int) -> cj.Engine:
    """A warmed-up engine in steady state: ``requests`` long decodes (and a finetuning job)."""
    engine = cj.Engine(model, cj.EngineConfig.flat(**CONFIG, overlap_host=overlap))
    engine.warmup(progress=False)
    rng = np.random.default_rng(0)
    for _ in range(requests):
        engine.add_request(rng.integers(3, 250, 8).tolist(),
                           cj.SamplingParams(max_tokens=900, ignore_eos=True))
    if finetune:
        data = from_records(synthetic_task("reverse", 64, seed=0), model.tokenizer,
                            DataConfig(max_seq_len=128))
        engine.submit_job(cj.FinetuneJob("ft", data, lora=cj.LoraConfig(r=8, lora_alpha=16),
                                         max_steps=10**6, sequences_per_step=2))
    for _ in range(warm):
        engine.step()
    return engine


def window(engine: cj.Engine, iterations: int) -> tuple[float, float, float]:
    """(wall seconds, replayed device seconds, host CPU seconds) of ``iterations``
    iterations."""
    commands = []
    engine.runner.mirror = commands.append
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(iterations):
        engine.step()
    cpu = time.thread_time() - cpu0
    jax.block_until_ready(engine.runner.kv.pages)
    wall = time.perf_counter() - t0
    engine.runner.mirror = None
    t0 = time.perf_counter()
    for command in commands:
        engine.runner.execute(command)
    jax.block_until_ready(engine.runner.kv.pages)
    return wall, time.perf_counter() - t0, cpu


def measure(model, requests: int, finetune: bool, iterations: int, warm: int,
            repeats: int, seed: int = 0) -> dict[bool, dict]:
    """Both loops, their windows interleaved ``repeats`` times (the machine's drift hits
    both loops, and each window's live run and replay, alike). The host share is
    ``1 - sum(replays) / sum(live windows)`` over all windows, with a bootstrap 90%
    interval over the windows."""
    engines = {overlap: engine_for(model, requests, finetune, overlap, warm)
               for overlap in (False, True)}
    runs = {False: [], True: []}
    for _ in range(repeats):
        for overlap, engine in engines.items():
            runs[overlap].append(window(engine, iterations))
    rng = np.random.default_rng(seed)
    out = {}
    for overlap, pairs in runs.items():
        wall, device, cpu = (np.array(x) / iterations for x in zip(*pairs, strict=True))
        picks = rng.integers(0, len(pairs), (2000, len(pairs)))
        shares = 1 - device[picks].sum(axis=1) / wall[picks].sum(axis=1)
        out[overlap] = {"wall_ms": 1e3 * float(wall.mean()),
                        "device_ms": 1e3 * float(device.mean()),
                        "host_cpu_ms": 1e3 * float(cpu.mean()),
                        "host_share": float(1 - device.sum() / wall.sum()),
                        "host_share_range": tuple(float(q) for q in
                                                  np.percentile(shares, [5, 95]))}
    return out


def outputs_match(model) -> bool:
    """Greedy outputs of the two loops on the same prompts."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 250, int(n)).tolist() for n in rng.integers(2, 40, 12)]
    got = []
    for overlap in (False, True):
        engine = cj.Engine(model, cj.EngineConfig.flat(**CONFIG, overlap_host=overlap))
        got.append(engine.generate(prompts, cj.SamplingParams(max_tokens=24, ignore_eos=True)))
    return got[0] == got[1]


def _share(r: dict) -> str:
    lo, hi = r["host_share_range"]
    return f"{100 * r['host_share']:.1f}% ({100 * lo:.1f} to {100 * hi:.1f}%)"


def split_cores() -> str:
    """Pins the XLA CPU client's threads to the last core and this (host) thread to the
    others. Must run before jax starts its CPU client: its threads inherit the affinity
    of the thread that creates them."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--split-cores needs at least two cores")
    os.sched_setaffinity(0, {cores[-1]})
    jax.block_until_ready(jax.numpy.ones((256, 256)) @ jax.numpy.ones((256, 256)))
    os.sched_setaffinity(0, set(cores[:-1]))
    return f"XLA threads on core {cores[-1]}, host thread on cores {cores[:-1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20,
                   help="iterations per window (contexts grow by repeats x iterations)")
    p.add_argument("--quick", action="store_true", help="10 windows per loop")
    p.add_argument("--repeats", type=int, default=30,
                   help="interleaved windows per loop")
    p.add_argument("--split-cores", action="store_true",
                   help="XLA's threads on the last core, the host on the others")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    cores = split_cores() if args.split_cores else "host and XLA threads share every core"
    iterations, repeats = args.iterations, 10 if args.quick else args.repeats
    info = machine_info()
    model = cj.load_model(cj.tiny_model_dir(), progress=False)
    rows = []
    for name, (requests, finetune) in SCENARIOS.items():
        result = measure(model, requests, finetune, iterations, warm=20,
                         repeats=repeats)
        sync, over = result[False], result[True]
        rows.append([name, f"{sync['wall_ms']:.2f}", f"{sync['device_ms']:.2f}",
                     f"{sync['host_cpu_ms']:.2f}", _share(sync), f"{over['wall_ms']:.2f}",
                     f"{over['device_ms']:.2f}", f"{over['host_cpu_ms']:.2f}", _share(over),
                     f"{sync['wall_ms'] / over['wall_ms']:.2f}x"])
        print(rows[-1], flush=True)
    same = outputs_match(model)
    table = markdown_table(
        ["scenario", "sync ms/iter", "sync device ms/iter", "sync host CPU ms/iter",
         "sync host share", "overlap ms/iter", "overlap device ms/iter",
         "overlap host CPU ms/iter", "overlap host share", "speed-up"], rows)
    flags = os.environ.get("XLA_FLAGS", "")
    body = (f"{table}\n\nCores: {cores}. XLA_FLAGS: `{flags or '(none)'}`. {repeats} "
            f"interleaved windows of {iterations} iterations per loop, each replayed right "
            f"after it; ms/iter are means, host share = 1 - total replay / total wall "
            f"(bootstrap 90% interval over windows); embedded model. Greedy outputs of the "
            f"two loops identical: {same}.")
    print(body)
    if not same:
        raise SystemExit("the overlapped loop changed outputs")
    if not args.no_record:
        record("Host overlap (synchronous vs overlapped loop)", info, body)


if __name__ == "__main__":
    main()
