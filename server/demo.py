"""``make demo``: the gRPC server on the embedded model, a mixed workload, a summary.

It starts the server in this process (on a free loopback port, with its Prometheus
endpoint and its OpenAI-compatible HTTP API, whose ``curl`` line it prints and runs
once), then drives it through the gRPC client: generation streams arrive at
a Poisson rate, each with TTFT/TPOT targets, while a LoRA finetuning job learns the
synthetic "uppercase" task (``uppercase: abc`` -> ``ABC``) in the same engine steps.
A live bar shows the job's step, loss and tokens/s and the streams served. At the end
it prints SLO attainment, TTFT and TPOT percentiles, finetuning throughput, the loss
from start to end, and the task's exact-match and character accuracy on held-out
prompts with the job's adapter before and after training; ``--json FILE`` writes the
same summary for machines. Then the server drains and stops.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

EXAMPLE_PROMPTS = [
    "The quick brown fox", "Co-serving means", "In a paged KV cache, every sequence",
    "Hello", "LoRA adapters are small", "One jitted step serves prefill and decode tokens",
    "uppercase: hello\n", "Tokens arrive at a Poisson rate and",
]
# The engine configuration test_finetune_learns uses: the job learns the task in ~600 steps.
DEMO_ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256,
                   max_train_seqs=8, train_window=32, backward_layers=4,
                   backward_pieces_per_step=4)
FULL = dict(streams=48, rate=1.5, steps=600, held_out=32)
QUICK = dict(streams=16, rate=4.0, steps=60, held_out=8)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: embedded)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run for CI ({QUICK['streams']} streams, {QUICK['steps']} "
                        "finetuning steps)")
    p.add_argument("--streams", type=int, help=f"generation streams (default {FULL['streams']})")
    p.add_argument("--rate", type=float, help="stream arrivals per second (Poisson; "
                   f"default {FULL['rate']})")
    p.add_argument("--steps", type=int, help=f"finetuning steps (default {FULL['steps']})")
    p.add_argument("--held-out", type=int, help="held-out prompts for the accuracy "
                   f"(default {FULL['held_out']})")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target, s")
    p.add_argument("--tpot-slo", type=float, default=0.25, help="TPOT target, s")
    p.add_argument("--no-warmup", action="store_true", help="compile buckets lazily")
    p.add_argument("--json", help="write the summary here as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


def _accuracy(client, records: list[dict], adapter: str) -> dict:
    """Exact-match and per-character accuracy of greedy answers (concurrent streams)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda r: client.generate(
            r["prompt"], max_tokens=8, add_bos=True, adapter=adapter, timeout=120).text,
            records))
    want = [r["completion"] for r in records]
    exact = float(np.mean([t == w for t, w in zip(texts, want, strict=True)]))
    chars = sum(sum(a == b for a, b in zip(t, w, strict=False)) for t, w in zip(texts, want,
                                                                                 strict=True))
    return {"exact": exact, "chars": chars / sum(len(w) for w in want),
            "examples": [[r["prompt"].strip(), t] for r, t in zip(records[:3], texts,
                                                                  strict=False)]}


class Workload:
    """Generation streams arriving at a Poisson rate, each on its own client thread."""

    def __init__(self, client, n: int, rate: float, ttft: float, tpot: float, seed: int):
        self.client, self.n, self.rate, self.ttft, self.tpot = client, n, rate, ttft, tpot
        self.rng = np.random.default_rng(seed)
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.refused: list[str] = []
        self.done = 0
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(n, 1))
        self._thread = threading.Thread(target=self._arrivals, daemon=True)

    def start(self) -> Workload:
        self._thread.start()
        return self

    def _arrivals(self) -> None:
        for i in range(self.n):
            time.sleep(float(self.rng.exponential(1.0 / self.rate)))
            prompt = EXAMPLE_PROMPTS[i % len(EXAMPLE_PROMPTS)]
            max_tokens = int(self.rng.integers(8, 49))
            sampled = i % 2 == 1
            self._pool.submit(self._one, i, prompt, max_tokens, sampled)

    def _one(self, i: int, prompt: str, max_tokens: int, sampled: bool) -> None:
        try:
            c = self.client.generate(prompt, max_tokens=max_tokens, ignore_eos=True,
                                     add_bos=True, temperature=0.8 if sampled else 0.0,
                                     top_p=0.95 if sampled else None, seed=i,
                                     ttft_s=self.ttft, tpot_s=self.tpot, timeout=300)
            r = c.result
            row = {"prompt": prompt, "text": c.text, "tokens": len(c.token_ids),
                   "max_tokens": max_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
                   "slo_attained": r.slo_attained, "complete": len(c.token_ids) == max_tokens
                   and r.completion_tokens == max_tokens}
            with self._lock:
                self.results.append(row)
        except grpc.RpcError as e:  # counted and reported, never fatal to the demo
            with self._lock:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refused.append(e.details())  # admission control said no
                else:
                    self.errors.append(f"{e.code().name}: {e.details()}")
        finally:
            with self._lock:
                self.done += 1

    def join(self) -> None:
        self._thread.join()
        self._pool.shutdown(wait=True)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = QUICK if args.quick else FULL  # what the options leave unset
    args.streams = preset["streams"] if args.streams is None else args.streams
    args.rate = args.rate or preset["rate"]
    args.steps = args.steps or preset["steps"]
    args.held_out = args.held_out or preset["held_out"]

    import coserve_jax
    from server.engine_api import real_backend

    t_start = time.perf_counter()
    path = args.model or coserve_jax.tiny_model_dir()
    print(f"model: {path}")
    t0 = time.perf_counter()
    backend = real_backend(path, coserve_jax.EngineConfig.flat(**DEMO_ENGINE),
                           warmup=not args.no_warmup)
    compile_s = time.perf_counter() - t0
    print(f"engine ready in {compile_s:.1f}s ({len(backend.engine.buckets)} batch buckets; "
          f"finetuning beside requests by {backend.engine.finetune_unit})")

    # The server's job records and adapters live here and go however the run ends,
    # a server that fails to start included.
    with tempfile.TemporaryDirectory(prefix="coserve-demo-", ignore_cleanup_errors=True) as state:
        exit_code, summary = _serve(backend, state, args, compile_s, t_start)
    if args.json:
        summary["total_s"] = time.perf_counter() - t_start
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return exit_code


def _serve(backend, state: str, args: argparse.Namespace, compile_s: float,
           t_start: float) -> tuple[int, dict]:
    """Run the workload and the job on a server over ``backend``; its state goes in ``state``."""
    from coserve_jax.finetune.data import synthetic_task
    from coserve_jax.lora.config import ALL_TARGETS
    from server.app import ServerConfig, ServerThread
    from server.client import Client, finetune_request
    from server.commands import describe_job

    config = ServerConfig(port=0, metrics_port=0, http_port=0,
                          state_dir=os.path.join(state, "state"),
                          adapter_root=os.path.join(state, "adapters"))
    server = ServerThread(backend, config).start()
    print(f"server: {server.address} (gRPC), {server.http_url} (OpenAI-compatible HTTP), "
          f"metrics: {server.metrics_url}")
    client = Client(server.address)
    try:
        http = _http_check(server)
        records = synthetic_task("uppercase", 1024, seed=args.seed, min_len=3, max_len=5)
        held_out = synthetic_task("uppercase", args.held_out, seed=99, min_len=3, max_len=5)
        # The job's adapter starts with B = 0, i.e. exactly the base model.
        before = _accuracy(client, held_out, adapter="")
        job = client.submit_finetune(finetune_request(
            "upper", records=records, r=16, lora_alpha=32, target_modules=ALL_TARGETS,
            learning_rate=1e-3, sequences_per_step=4, max_steps=args.steps, max_seq_len=64,
            seed=args.seed))
        print(f"finetuning job 'upper': {job.num_samples} samples, {args.steps} steps, "
              f"LoRA r=16 on all 7 projections; {args.streams} streams at {args.rate:g}/s "
              "alongside")
        t_work = time.perf_counter()
        workload = Workload(client, args.streams, args.rate, args.ttft_slo, args.tpot_slo,
                            args.seed).start()
        job = _follow(client, workload, args.steps)
        workload.join()
        work_s = time.perf_counter() - t_work
        after = _accuracy(client, held_out, adapter="upper")
        print(describe_job(job))
        summary = _summary(workload, job, before, after, compile_s, work_s,
                           args.ttft_slo, args.tpot_slo)
        summary["http"] = http
        _print_summary(summary)
        ok = (not workload.errors and job.state == 3
              and all(r["complete"] for r in workload.results))
        exit_code = 0 if ok else 1
    finally:
        client.close()
        code = server.drain()
        print(f"server stopped (exit code {code}); total {time.perf_counter() - t_start:.0f}s")
    return exit_code, summary


def _http_check(server) -> dict:
    """Prints the curl line that reaches the running server's HTTP API, and sends the same
    request once (what it printed works)."""
    import shlex
    import urllib.request

    model = server.server.http.ctx.model_id
    url = f"{server.http_url}/completions"
    body = json.dumps({"model": model, "prompt": EXAMPLE_PROMPTS[0], "max_tokens": 16,
                       "temperature": 0})
    curl = (f"curl {url} -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    print(f"try the HTTP API while the demo runs (any OpenAI client works, base URL "
          f"{server.http_url}):\n  {curl}")
    request = urllib.request.Request(url, body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    print(f"  -> {answer['choices'][0]['text']!r} "
          f"({answer['usage']['completion_tokens']} tokens)")
    return {"url": server.http_url, "curl": curl, "model": model,
            "completion_tokens": answer["usage"]["completion_tokens"]}


def _follow(client, workload: Workload, steps: int):
    """A live bar of the job, with the streams served so far; returns the job at its end."""
    from tqdm.auto import tqdm

    job = None
    with tqdm(total=steps, desc="finetuning", unit="step", file=sys.stdout,
              dynamic_ncols=True) as bar:
        for job in client.watch_job("upper", interval_s=0.5):
            bar.n = job.step
            bar.set_postfix({"loss": f"{job.loss:.3f}" if job.HasField("loss") else "-",
                             "tok/s": f"{job.tokens_per_s:.0f}",
                             "streams": f"{workload.done}/{workload.n}"}, refresh=False)
            bar.refresh()
    return job


def _summary(workload: Workload, job, before: dict, after: dict, compile_s: float,
             work_s: float, ttft_slo: float, tpot_slo: float) -> dict:
    rows = workload.results
    ttft = [r["ttft_s"] for r in rows]
    tpot = [r["tpot_s"] for r in rows if r["tokens"] > 1]
    return {
        "streams": {"requested": workload.n, "completed": len(rows),
                    "complete_outputs": sum(r["complete"] for r in rows),
                    "refused": len(workload.refused), "errors": workload.errors,
                    "tokens": sum(r["tokens"] for r in rows)},
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo,
                "attainment": float(np.mean([r["slo_attained"] for r in rows])) if rows
                else None},
        "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "tpot_s": {"p50": _pct(tpot, 50), "p99": _pct(tpot, 99)},
        "finetune": {"state": int(job.state), "steps": job.step,
                     "tokens_trained": job.tokens_trained,
                     "tokens_per_s": job.tokens_per_s,
                     "loss_start": job.first_loss if job.HasField("first_loss") else None,
                     # the mean of the last 10 steps: one step's loss is noisy
                     "loss_end": job.recent_loss if job.HasField("recent_loss") else None,
                     "loss_last_step": job.loss if job.HasField("loss") else None},
        "accuracy_before": before, "accuracy_after": after,
        "compile_s": compile_s, "workload_s": work_s,
    }


def _print_summary(s: dict) -> None:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.0f} ms"  # noqa: E731
    st, ft = s["streams"], s["finetune"]
    print("\n=== summary ===")
    print(f"streams: {st['completed']}/{st['requested']} completed "
          f"({st['complete_outputs']} with their full output), {st['tokens']} tokens, "
          f"{st['refused']} refused at admission, {len(st['errors'])} errors")
    att = s["slo"]["attainment"]
    print(f"SLO attainment: {'-' if att is None else f'{att:.0%}'} "
          f"(TTFT <= {s['slo']['ttft_s']:g}s and TPOT <= {s['slo']['tpot_s']:g}s)")
    print(f"TTFT p50 {ms(s['ttft_s']['p50'])}, p99 {ms(s['ttft_s']['p99'])}; "
          f"TPOT p50 {ms(s['tpot_s']['p50'])}, p99 {ms(s['tpot_s']['p99'])}")
    loss = "-" if ft["loss_end"] is None else \
        f"{ft['loss_start']:.3f} -> {ft['loss_end']:.3f} (mean of the last 10 steps)"
    print(f"finetuning: {ft['steps']} steps, {ft['tokens_trained']} tokens, "
          f"{ft['tokens_per_s']:.0f} tokens/s; loss {loss}")
    b, a = s["accuracy_before"], s["accuracy_after"]
    print(f"uppercase task, held-out prompts: exact {b['exact']:.0%} -> {a['exact']:.0%}, "
          f"characters {b['chars']:.0%} -> {a['chars']:.0%}")
    for (prompt, got_before), (_, got_after) in zip(b["examples"], a["examples"], strict=False):
        print(f"  {prompt!r}: before {got_before!r}, after {got_after!r}")
    print("(random base weights: free text is noise; the adapter's task is learned)")


if __name__ == "__main__":
    raise SystemExit(main())
