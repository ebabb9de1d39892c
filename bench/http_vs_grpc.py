"""HTTP (OpenAI-compatible) against gRPC on the same engine and the same load.

It starts ``coserve serve --http-port`` in a subprocess (the embedded model with the
demo's engine config, or ``--mock`` for the deterministic mock engine, which isolates
the front doors' own cost), then, in this process, runs rounds of ``--clients``
concurrent streaming clients, each sending ``--requests`` requests one after another
(greedy, ``--max-tokens`` tokens, EOS ignored). Rounds alternate HTTP (the official
``openai`` client, ``stream=True``) and gRPC (``server.client``), so both see the same
machine load. It reports, per door, streaming tokens/s (completion tokens over the
round's wall time), TTFT p50/p99 (request sent to first token received) and the HTTP
path's ratio to gRPC, and appends them to BENCHMARKS.md.

    python bench/http_vs_grpc.py                 # a few minutes on CPU
    python bench/http_vs_grpc.py --mock --clients 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np

from benchlib import REPO_ROOT, library_revision, record, scratch_dir

PROMPTS = ["The quick brown fox", "Co-serving means", "In a paged KV cache, every sequence",
           "Hello", "LoRA adapters are small", "One jitted step serves prefill and decode"]


def start_server(mock: bool, config_path: str) -> tuple[subprocess.Popen, str, str]:
    args = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--http-port",
            "0", "--max-streams", "1024", "--max-queue", "1024", "--state-dir",
            scratch_dir("coserve-bench-")]
    args += ["--mock-engine", json.dumps({"step_delay": 0.0, "max_num_seqs": 64,
                                          "max_model_len": 512})] if mock \
        else ["--config", config_path, "--no-warmup"]  # the warm-up rounds compile what is used
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    grpc_address = http_url = None
    deadline = time.monotonic() + 900
    while grpc_address is None or http_url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(lines[-30:]))
        lines.append(line)
        if m := re.search(r"serving on (\S+)", line):
            grpc_address = m.group(1)
        if m := re.search(r"OpenAI-compatible API on (\S+)", line):
            http_url = m.group(1)
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, grpc_address, http_url


def http_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - t0  # every chunk carries at least one token
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


def grpc_request(client, prompt: str, max_tokens: int) -> tuple[float, int]:
    from server.client import generate_request

    t0 = time.perf_counter()
    ttft, tokens = None, 0
    for message in client.stream(generate_request(prompt, max_tokens=max_tokens,
                                                  ignore_eos=True)):
        if message.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        tokens += len(message.token_ids)
    return ttft, tokens


def run_round(door: str, clients: int, requests: int, max_tokens: int, call) -> dict:
    def worker(i: int) -> list[tuple[float, int]]:
        return [call(PROMPTS[(i + j) % len(PROMPTS)], max_tokens) for j in range(requests)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        rows = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in rows)
    assert tokens == clients * requests * max_tokens, (door, tokens)
    return {"door": door, "tokens_per_s": tokens / wall, "ttft": [t for t, _ in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mock", action="store_true", help="the mock engine (front doors only)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="per client and round")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="rounds per door (alternating)")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)

    import openai

    from server.client import Client
    from server.demo import DEMO_ENGINE

    # A shared machine's other work shows up as outlier rounds: medians, and the load.
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    config_path = os.path.join(scratch_dir("coserve-bench-engine-"), "engine.json")
    with open(config_path, "w") as f:
        json.dump(DEMO_ENGINE, f)
    proc, grpc_address, http_url = start_server(args.mock, config_path)
    try:
        http = openai.OpenAI(base_url=http_url, api_key="none", max_retries=0, timeout=600)
        model = http.models.list().data[0].id
        grpc_client = Client(grpc_address)
        doors = {"http": lambda prompt, n: http_request(http, model, prompt, n),
                 "grpc": lambda prompt, n: grpc_request(grpc_client, prompt, n)}
        for door, call in doors.items():  # warm both paths (and the buckets they use)
            run_round(door, args.clients, 2, args.max_tokens, call)
        rounds = []
        for i in range(args.rounds * 2):
            door = ("http", "grpc")[i % 2]
            rounds.append(run_round(door, args.clients, args.requests, args.max_tokens,
                                    doors[door]))
            print(f"{door}: {rounds[-1]['tokens_per_s']:.0f} tokens/s")
        grpc_client.close()
    finally:
        proc.terminate()
        proc.wait(60)

    summary = {}
    for door in ("http", "grpc"):
        mine = [r for r in rounds if r["door"] == door]
        ttft = [t for r in mine for t in r["ttft"]]
        summary[door] = {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in mine])),
                         "ttft_p50": float(np.percentile(ttft, 50)),
                         "ttft_p99": float(np.percentile(ttft, 99))}
    h, g = summary["http"], summary["grpc"]
    table = "\n".join([
        "| door | streaming tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |", "|---|---|---|---|",
        *[f"| {d} | {s['tokens_per_s']:.0f} | {s['ttft_p50'] * 1e3:.1f} | "
          f"{s['ttft_p99'] * 1e3:.1f} |" for d, s in summary.items()]])
    notes = (f"- HTTP / gRPC: tokens/s {h['tokens_per_s'] / g['tokens_per_s']:.3f}x, "
             f"TTFT p50 {h['ttft_p50'] / g['ttft_p50']:.3f}x, "
             f"TTFT p99 {h['ttft_p99'] / g['ttft_p99']:.3f}x")
    print(table + "\n" + notes)
    if not args.no_record:
        import jax

        record("http_vs_grpc: " + ("mock engine" if args.mock else "embedded model"), {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
                       f"on {jax.default_backend()}",
            "commit": library_revision(),
            "load": f"{args.clients} concurrent streaming clients x {args.requests} requests "
                    f"x {args.max_tokens} tokens (greedy, EOS ignored) per round, "
                    f"{args.rounds} rounds per door, alternating; server in a subprocess",
            "load average at start / end": f"{load_start} / "
                                           + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }, table + "\n\n" + notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
