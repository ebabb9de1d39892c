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
device waits for the host. The two loops run interleaved windows in one process (medians
over --repeats), so the figures are ratios
on whatever machine runs it. Greedy outputs of the two loops are compared too.

On a CPU the "device" is the same cores as the host: XLA's threads and the host's Python
share them, so host work hidden behind a step still slows it. Running with
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`` gives
the programs one core and leaves the other to the host, as a GPU does.

    python bench/host_overlap.py            # appends to BENCHMARKS.md
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


def window(engine: cj.Engine, iterations: int) -> tuple[float, float]:
    """(wall seconds, replayed device seconds) of ``iterations`` iterations."""
    commands = []
    engine.runner.mirror = commands.append
    t0 = time.perf_counter()
    for _ in range(iterations):
        engine.step()
    jax.block_until_ready(engine.runner.kv.pages)
    wall = time.perf_counter() - t0
    engine.runner.mirror = None
    t0 = time.perf_counter()
    for command in commands:
        engine.runner.execute(command)
    jax.block_until_ready(engine.runner.kv.pages)
    return wall, time.perf_counter() - t0


def measure(model, requests: int, finetune: bool, iterations: int, warm: int,
            repeats: int) -> dict[bool, dict]:
    """Both loops, their windows interleaved ``repeats`` times (the machine's drift hits
    both alike); medians per iteration."""
    engines = {overlap: engine_for(model, requests, finetune, overlap, warm)
               for overlap in (False, True)}
    runs = {False: [], True: []}
    for _ in range(repeats):
        for overlap, engine in engines.items():
            runs[overlap].append(window(engine, iterations))
    out = {}
    for overlap, pairs in runs.items():
        wall = np.array([w for w, _ in pairs]) / iterations
        device = np.array([d for _, d in pairs]) / iterations
        share = np.maximum(0.0, 1 - device / wall)
        out[overlap] = {"wall_ms": 1e3 * float(np.median(wall)),
                        "device_ms": 1e3 * float(np.median(device)),
                        "host_share": float(np.median(share)),
                        "host_share_range": (float(share.min()), float(share.max()))}
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
    return f"{100 * r['host_share']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}%)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=100,
                   help="iterations per window (contexts grow by repeats x iterations)")
    p.add_argument("--quick", action="store_true", help="40 iterations per window")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved windows per loop (medians are reported)")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    iterations = 40 if args.quick else args.iterations
    info = machine_info()
    model = cj.load_model(cj.tiny_model_dir(), progress=False)
    rows = []
    for name, (requests, finetune) in SCENARIOS.items():
        result = measure(model, requests, finetune, iterations, warm=20,
                         repeats=args.repeats)
        sync, over = result[False], result[True]
        rows.append([name, f"{sync['wall_ms']:.2f}", f"{sync['device_ms']:.2f}",
                     _share(sync), f"{over['wall_ms']:.2f}",
                     f"{over['device_ms']:.2f}", _share(over),
                     f"{sync['wall_ms'] / over['wall_ms']:.2f}x"])
        print(rows[-1], flush=True)
    same = outputs_match(model)
    table = markdown_table(
        ["scenario", "sync ms/iter", "sync device ms/iter", "sync host share",
         "overlap ms/iter", "overlap device ms/iter", "overlap host share",
         "speed-up"], rows)
    flags = os.environ.get("XLA_FLAGS", "")
    body = (f"{table}\n\nXLA_FLAGS: `{flags or '(none)'}`. Medians of {args.repeats} "
            f"interleaved windows of {iterations} iterations (host share: median, range); "
            f"embedded model; device "
            f"time = the window's runner commands replayed back to back. Greedy "
            f"outputs of the two loops identical: {same}.")
    print(body)
    if not same:
        raise SystemExit("the overlapped loop changed outputs")
    if not args.no_record:
        record("Host overlap (synchronous vs overlapped loop)", info, body)


if __name__ == "__main__":
    main()
