"""Co-serving benchmark: every scheduling mode on the same trace, side by side.

For each mode and arrival rate it drives the engine in real time with a Poisson
trace (ShareGPT-shaped lengths, scaled to the model) while a finetuning job
trains, and reports SLO attainment, TTFT and TPOT p50/p99, inference tokens/s and
finetuning tokens/s (tokens whose forward and backward both finished). The
separate-cluster baseline is computed as FlexLLM normalised it: a fraction f of
the hardware serves inference at rate lambda/f (the inference-only run at that
rate), the rest finetunes at (1-f) of finetune-only throughput.

    python bench/coserve.py --quick --json out.json      # a few minutes on CPU
    python bench/coserve.py --rates 1 2 4 8 --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import coserve_jax as cj
from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, OptimizerConfig
from coserve_jax.finetune.data import DataConfig, from_records
from coserve_jax.slo import SLO, AdmissionError
from coserve_jax.workload import poisson_arrivals, sharegpt_lengths

from benchlib import library_revision, record

SEPARATE_FRACTIONS = (0.25, 0.5, 0.75)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_config(mode: str, args) -> EngineConfig:
    """The same engine for every mode; only the scheduling policy differs."""
    max_model_len = getattr(args, "max_model_len", 512)
    # One layer per backward piece: the smallest unit of backward work, so that a piece
    # fits beside a decode step within the TPOT target rather than waiting for a lull.
    return EngineConfig(
        mode=mode, max_num_seqs=16, max_num_batched_tokens=128, max_model_len=max_model_len,
        num_pages=512, max_train_seqs=8, max_train_len=min(256, max_model_len),
        train_window=64, backward_layers=1, backward_pieces_per_step=8,
        min_page_bucket=getattr(args, "min_page_bucket", 8), default_ttft_s=args.ttft_s,
        default_tpot_s=args.tpot_ms / 1000)


def finetune_job(model, seed: int = 0, max_len: int = 256) -> FinetuneJob:
    """A job that outlasts any run: random-letter texts of 100-250 characters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    records = [{"text": "".join(rng.choice(letters, size=int(n)))}
               for n in rng.integers(100, 250, 256)]
    data = from_records(records, model.tokenizer, DataConfig(max_seq_len=max_len))
    return FinetuneJob("bench", data, lora=LoraConfig(r=16, lora_alpha=32,
                                                      target_modules=("q_proj", "v_proj",
                                                                      "down_proj")),
                       optimizer=OptimizerConfig(learning_rate=1e-4), sequences_per_step=8,
                       max_steps=10**6, seed=seed)


def run_one(model, mode: str, rate: float, args) -> dict:
    """Drives one engine for ``args.duration`` seconds of trace; returns a record."""
    engine = Engine(model, engine_config(mode, args))
    engine.warmup(progress=False)
    if mode != "inference-only":
        engine.submit_job(finetune_job(model, max_len=engine.trainer.config.max_len))
        run = engine.trainer.jobs["bench"]
    slo = SLO(args.ttft_s, args.tpot_ms / 1000)
    rng = np.random.default_rng(args.seed)
    arrivals = poisson_arrivals(rate, args.duration, args.seed) if rate > 0 else np.zeros(0)
    longest = int(0.4 * getattr(args, "max_model_len", 512))
    prompt_lens, output_lens = sharegpt_lengths(len(arrivals), args.seed, scale=args.scale,
                                                max_prompt=longest, max_output=longest)
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in prompt_lens]
    refused, out_tokens, metrics = 0, 0, []
    ft_tokens_at_end = None
    host = iteration = 0.0
    start = time.monotonic()
    i = 0
    while True:
        now = time.monotonic() - start
        while i < len(arrivals) and arrivals[i] <= now:
            params = cj.SamplingParams(max_tokens=int(output_lens[i]), ignore_eos=True)
            try:
                engine.add_request(prompts[i], params, slo=slo, arrival_time=start + arrivals[i])
            except AdmissionError:
                refused += 1
            i += 1
        if now >= args.duration:
            if ft_tokens_at_end is None:
                ft_tokens_at_end = run.tokens_trained if mode != "inference-only" else 0
                host, iteration = engine.counters["host_s"], engine.counters["iteration_s"]
            if not (engine.running or engine.waiting) or now > args.duration + args.drain:
                break
        busy = engine.running or engine.waiting or (
            mode != "inference-only" and now < args.duration)
        if not busy:
            time.sleep(max(0.0, min(arrivals[i] - now if i < len(arrivals) else 0.01, 0.01)))
            continue
        for out in engine.step():
            if time.monotonic() - start <= args.duration:
                out_tokens += len(out.new_token_ids)
            if out.finished:
                metrics.append(out.metrics)
    unfinished = len(engine.running) + len(engine.waiting)
    n = len(metrics) + refused + unfinished
    attained = sum(m.slo_attained for m in metrics)
    ttft = np.array([m.ttft_s for m in metrics]) if metrics else np.zeros(1)
    tpot = np.array([m.tpot_s for m in metrics]) if metrics else np.zeros(1)
    return {
        "mode": mode, "rate": rate, "requests": n, "refused": refused, "unfinished": unfinished,
        "slo_attainment": attained / n if n else 1.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99)),
        "inference_tokens_per_s": out_tokens / args.duration,
        "ft_tokens_per_s": ft_tokens_at_end / args.duration,
        "host_fraction": host / iteration if iteration else 0.0,
        "steps": engine.counters["steps"], "mixed_steps": engine.counters["mixed_steps"],
    }


def separate_cluster(records: list[dict], rates: list[float], ft_only: float) -> list[dict]:
    """FlexLLM's normalised separate-cluster baseline from inference-only runs at lambda/f."""
    by_rate = {r["rate"]: r for r in records if r["mode"] == "inference-only"}
    out = []
    for rate in rates:
        for f in SEPARATE_FRACTIONS:
            inf = by_rate[round(rate / f, 6)]
            out.append({**{k: inf[k] for k in ("slo_attainment", "ttft_p50_s", "ttft_p99_s",
                                               "tpot_p50_s", "tpot_p99_s")},
                        "mode": f"separate:{int(f * 100)}%", "rate": rate,
                        "inference_tokens_per_s": inf["inference_tokens_per_s"] * f,
                        "ft_tokens_per_s": (1 - f) * ft_only})
    return out


def compare(records: list[dict], rates: list[float], ft_only: float) -> list[str]:
    """Lines checking the issue's targets at each rate."""
    lines = []
    for rate in rates:
        at = {r["mode"]: r for r in records if r["rate"] == rate}
        co, inf = at.get("coserve"), at.get("inference-only")
        if co is None or inf is None:
            continue
        if inf["slo_attainment"] >= 0.95:
            ok = co["slo_attainment"] >= 0.95
            lines.append(f"rate {rate:g}: inference-only {inf['slo_attainment']:.1%}, coserve "
                         f"{co['slo_attainment']:.1%} -> {'OK' if ok else 'MISSED'} (>= 95%)")
        need = min(0.95, co["slo_attainment"])
        for family, label, factor in (("temporal", "temporal", 2.0),
                                      ("separate", "separate cluster", 1.9)):
            rivals = [r for m, r in at.items() if m.startswith(family)
                      and r["slo_attainment"] >= need]
            if not rivals:
                lines.append(f"rate {rate:g}: no {label} variant reaches {need:.1%} attainment")
                continue
            best = max(rivals, key=lambda r: r["ft_tokens_per_s"])
            ratio = co["ft_tokens_per_s"] / max(best["ft_tokens_per_s"], 1e-9)
            # Co-serving cannot finetune faster than finetune-only: the best ratio possible.
            ceiling = ft_only / max(best["ft_tokens_per_s"], 1e-9)
            lines.append(f"rate {rate:g}: coserve finetuning {co['ft_tokens_per_s']:.0f} tok/s "
                         f"= {ratio:.2f}x best {label} ({best['mode']}) -> "
                         f"{'OK' if ratio >= factor else 'MISSED'} (>= {factor}x; "
                         f"finetune-only bounds it at {ceiling:.2f}x here)")
    return lines


def table(records: list[dict], ft_only: float) -> str:
    head = ("| mode | rate (req/s) | SLO attainment | TTFT p50/p99 (s) | TPOT p50/p99 (ms) "
            "| inference tok/s | finetuning tok/s | share of finetune-only | host time |")
    rows = [head, "|" + "---|" * 9]
    for r in sorted(records, key=lambda r: (r["rate"], r["mode"])):
        rows.append(
            f"| {r['mode']} | {r['rate']:g} | {r['slo_attainment']:.1%} | "
            f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_s'] * 1e3:.1f}/{r['tpot_p99_s'] * 1e3:.1f} | "
            f"{r['inference_tokens_per_s']:.0f} | {r['ft_tokens_per_s']:.0f} | "
            f"{r['ft_tokens_per_s'] / max(ft_only, 1e-9):.0%} | "
            f"{r.get('host_fraction', 0):.1%} |")
    return "\n".join(rows)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["mode"] for r in records}):
        pts = sorted((r["rate"], r["slo_attainment"], r["ft_tokens_per_s"])
                     for r in records if r["mode"] == mode)
        style = "--" if mode.startswith("separate") else "-"
        ax1.plot([p[0] for p in pts], [p[1] * 100 for p in pts], style, marker="o", label=mode)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=mode)
    ax1.set(xlabel="arrival rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 105))
    ax2.set(xlabel="arrival rate (req/s)", ylabel="finetuning tokens/s")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small version (a few minutes on CPU)")
    p.add_argument("--rates", type=float, nargs="+", help="arrival rates (requests/s)")
    p.add_argument("--modes", nargs="+", help="modes besides finetune-only")
    p.add_argument("--duration", type=float, help="seconds of trace per run")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to finish stragglers")
    p.add_argument("--ttft-s", type=float, default=2.0, help="TTFT target (s)")
    p.add_argument("--tpot-ms", type=float, default=40.0, help="TPOT target (ms)")
    p.add_argument("--scale", type=float, default=0.25, help="ShareGPT length scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model directory (default: the embedded model)")
    p.add_argument("--json", help="write the records here as a JSON list")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "out", "coserve.png"))
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    rates = args.rates or ([2.0, 6.0] if args.quick else [1.0, 2.0, 4.0, 8.0])
    modes = args.modes or (["inference-only", "coserve", "temporal:8", "temporal:dynamic"]
                           if args.quick else ["inference-only", "coserve", "temporal:4",
                                               "temporal:16", "temporal:64",
                                               "temporal:dynamic"])
    args.duration = args.duration or (8.0 if args.quick else 30.0)
    model = cj.load_model(args.model or cj.tiny_model_dir(), progress=False)

    records = [run_one(model, "finetune-only", 0.0, args)]
    ft_only = records[0]["ft_tokens_per_s"]
    print(f"finetune-only: {ft_only:.0f} finetuning tokens/s", flush=True)
    runs = [(m, r) for r in rates for m in modes]
    runs += [("inference-only", round(r / f, 6)) for r in rates for f in SEPARATE_FRACTIONS]
    done = set()
    for mode, rate in runs:
        if (mode, rate) in done:
            continue
        done.add((mode, rate))
        rec = run_one(model, mode, rate, args)
        records.append(rec)
        print(f"{mode:>18} @ {rate:g} req/s: attainment {rec['slo_attainment']:.1%}, "
              f"finetuning {rec['ft_tokens_per_s']:.0f} tok/s", flush=True)
    shown = [r for r in records if r["rate"] in rates or r["mode"] == "finetune-only"]
    shown += separate_cluster(records, rates, ft_only)
    text = table(shown, ft_only)
    checks = compare(shown, rates, ft_only)
    print(text)
    print("\n".join(checks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(shown, f, indent=1)
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot([r for r in shown if r["mode"] != "finetune-only"], args.plot)
    print(f"plot: {args.plot}")
    if not args.no_record:
        import jax

        record("coserve: scheduling modes side by side", {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"jax {jax.__version__} on {jax.devices()[0].platform}",
            "commit": library_revision(),
            "setup": f"SLO TTFT {args.ttft_s:g} s, TPOT {args.tpot_ms:g} ms; {args.duration:g} s "
                     f"of Poisson trace per run, ShareGPT lengths x{args.scale:g}; finetune-only "
                     f"{ft_only:.0f} tok/s"},
            text + "\n\n" + "\n".join(f"- {c}" for c in checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
