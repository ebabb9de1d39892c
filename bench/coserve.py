"""Co-serving benchmark: every scheduling mode on the same trace, side by side, in a
scale-free regime (it means the same on a 2-core CPU and on an H200).

The regime (DESIGN.md section 5, FlexLLM's evaluation):

- **SLO.** The TPOT target is ``--tpot-multiple`` (default 3) times inference-only's
  decode TPOT, measured first on this machine and model (one request at a time); FlexLLM's
  45 ms for Llama-3.1-8B is two to three of its decode steps. TTFT (arrival to first
  token) is ``--ttft-s``.
- **Load.** The peak rate is the highest arrival rate at which inference-only keeps 95%
  attainment, found here by doubling and bisection and printed; the runs use fractions
  of it (0.25, 0.5, 1.0 with ``--quick``; more in full runs), Poisson or bursty gamma
  (BurstGPT-shaped) arrivals, ShareGPT-shaped lengths scaled to the model.
- **Baselines** in the same engine: ``finetune-only`` (token-level, and in whole samples
  as a standard trainer runs them: the ratio is what graph pruning's recompute costs);
  FlexLLM's temporal sharing ``temporal-seq:N`` (a whole sample, forward and backward
  through every layer as a standard trainer runs it, every N inference iterations;
  ``dynamic`` picks the largest frequency that keeps the TPOT target; where none of the
  run's variants keeps coserve's attainment at a rate, FlexLLM's other periods, 64 to 512,
  run there in turn until one does); the token-level
  ablation ``temporal:N`` (our windows and layer pieces in the finetuning iterations, not
  co-batched); and FlexLLM's
  normalised separate clusters: a fraction f of the hardware serves inference at rate
  lambda/f (the inference-only run at that rate), the rest finetunes at (1-f) of the
  fastest finetune-only throughput (FlexLLM's separate cluster runs LLaMA-Factory, a
  standard trainer: whole samples, where they are faster than the token-level pieces).

Finetuning throughput counts tokens whose forward and backward both finished within the
trace. Every run is repeated in ``--rounds`` interleaved rounds and pooled (attainment over
all their requests), since a shared machine's speed drifts over minutes; round i draws its
own trace (seed ``--seed`` + i, the same for every mode in the round), so that a pooled
figure rests on several samples of the workload rather than one trace run twice, and a
trace lasts long enough to hold ``--min-requests`` requests on average at its rate (at a
few requests per second a 6-second trace holds a dozen, and one late request moves the
attainment by several points). A run during which the host's hypervisor gave other guests
more than ``--max-steal`` of its CPU time runs again, up to ``--steal-retries`` times, as does
a peak probe (``run_calm``), and the report counts them; a peak probe that fails runs as
many traces again and is judged on all of them, and the peak found is confirmed on new
traces (``find_peak``). The latency model is measured afresh at the start. Each run
appends nothing until the end, where the table and the target checks go to BENCHMARKS.md
(``--no-record`` skips it) and ``--json`` gets one record per mode and rate.

    python bench/coserve.py --quick --json out.json       # about 10-12 minutes on 2 CPU cores
    python bench/coserve.py --json out.json               # a full run: about an hour on 2 cores
    python bench/coserve.py --tier small --quick           # SmolLM2-135M shapes
    python bench/coserve.py --tier llama3-8b --quick --rounds 1 --modes inference-only \
        coserve temporal-seq:dynamic --no-longer-periods --json $OUT/coserve.json \
        --no-record                                                  # on a GPU
    python bench/coserve.py --fractions 0.25 0.5 0.75 1 --duration 30 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.stats import binom

# The repository root, for a machine where the project is not installed (a lent GPU).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import coserve_jax as cj  # noqa: E402
from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, OptimizerConfig  # noqa: E402
from coserve_jax.finetune.data import DataConfig, from_records  # noqa: E402
from coserve_jax.policy import parse_mode  # noqa: E402
from coserve_jax.slo import SLO, AdmissionError  # noqa: E402
from coserve_jax.workload import (  # noqa: E402
    SHAREGPT_MEAN_OUTPUT,
    gamma_arrivals,
    poisson_arrivals,
    sharegpt_lengths,
)

from benchlib import cpu_steal, library_revision, machine_line, record, scratch_dir, steal_share  # noqa: E402

SEPARATE_FRACTIONS = (0.25, 0.5, 0.75)
ABLATION = "token-level ablation"
FLEXLLM_PERIODS = (64, 128, 256, 512)
"""``temporal-seq``'s periods in FlexLLM's evaluation: a whole sample every N inference
iterations. The longer the period, the less it finetunes and the less it delays requests
(``longer_periods``)."""

# What the checks need, within about 15 minutes: coserve+token-level (reported, not
# checked) only in full runs or by --modes.
QUICK_MODES = ("inference-only", "coserve", "temporal-seq:64", "temporal-seq:dynamic",
               "temporal:dynamic")
FULL_MODES = ("inference-only", "coserve", "coserve+token-level",
              *(f"temporal-seq:{n}" for n in FLEXLLM_PERIODS), "temporal-seq:dynamic",
              "temporal:16", "temporal:dynamic")


WHOLE_SAMPLES = "finetune-only (whole samples)"
"""Finetune-only as a standard trainer runs it (temporal-seq with nothing to serve: one
jitted forward and backward per sample, activations kept), beside the token-level
``finetune-only``, whose backward pieces recompute each layer's forward (graph pruning)."""

IDLE_SAMPLES = "coserve+idle-samples"
"""coserve with ``SchedulingConfig.idle_whole_samples``: iterations with nothing to serve
run whole samples."""

WHOLE_SAMPLE_UNIT = "coserve+whole-samples"
"""coserve with ``SchedulingConfig.finetune_unit="samples"``: the slack the requests leave is
banked and spent on whole samples in iterations of their own."""

BESIDE = "coserve beside "
"""Prefix of the coserve runs beside a ``temporal-seq`` period that ``longer_periods``
added after the rounds: on the same traces, right before or after each of its runs, so that
``compare`` can also set the period against a coserve that met the same machine."""

TOKEN_UNIT = "coserve+token-level"
"""coserve with ``SchedulingConfig.finetune_unit="tokens"``: windows beside inference and
backward pieces (FlexLLM's token-level co-serving)."""

KEPT_PROJECTIONS = "coserve+kept-projections"
"""coserve with ``FinetuneConfig.keep_projections``: the forward windows save every
projection's output and the backward pieces reuse them (FlexLLM's graph pruning) instead
of recomputing each layer's forward."""


NO_HEADROOM = "coserve+no-slot-headroom"
"""coserve with ``SchedulingConfig.slot_headroom`` off: the TPOT targets alone bound how far
finetuning stretches the iterations, however full the sequence slots get."""


COSERVE_VARIANTS = (IDLE_SAMPLES, WHOLE_SAMPLE_UNIT, TOKEN_UNIT, KEPT_PROJECTIONS, NO_HEADROOM)
"""The modes above: coserve with one setting changed, for A/Bs on the same traces."""


SMALLEST_BUCKET = "+smallest-bucket"
"""A suffix to any mode: the engine with ``SchedulingConfig.cheapest_bucket`` off, each step
in the smallest bucket that holds it (as before 2026-12-06)."""


def engine_mode(mode: str) -> str:
    """The engine's scheduling mode of a benchmark mode: ``SMALLEST_BUCKET`` dropped, and the
    variants in ``COSERVE_VARIANTS`` coserve. Any other name passes through unchanged, to the
    engine's own check of its mode, which refuses a name it does not know."""
    mode = mode.removesuffix(SMALLEST_BUCKET)
    return "coserve" if mode in COSERVE_VARIANTS else mode


def engine_config(mode: str, args) -> EngineConfig:
    """The same engine for every mode; only the scheduling policy differs."""
    max_model_len = getattr(args, "max_model_len", 512)
    smallest = mode.endswith(SMALLEST_BUCKET)
    mode = mode.removesuffix(SMALLEST_BUCKET)
    idle_samples = mode == IDLE_SAMPLES
    keep = mode == KEPT_PROJECTIONS or getattr(args, "keep_projections", False)
    unit = {WHOLE_SAMPLE_UNIT: "samples", TOKEN_UNIT: "tokens"}.get(mode, "auto")
    headroom = mode != NO_HEADROOM
    # One layer per backward piece: the smallest unit of backward work, so that a piece
    # fits beside a decode step within the TPOT target rather than waiting for a lull.
    return EngineConfig.flat(
        mode=engine_mode(mode), max_num_seqs=16, max_num_batched_tokens=128,
        max_model_len=max_model_len, num_pages=512, max_train_seqs=8,
        max_train_len=min(256, max_model_len), train_window=64, backward_layers=1,
        backward_pieces_per_step=8,
        backward_block=getattr(args, "backward_block", 0),
        keep_projections=keep,
        min_token_bucket=getattr(args, "min_token_bucket", 16),
        min_page_bucket=getattr(args, "min_page_bucket", 8),
        min_seq_bucket=getattr(args, "min_seq_bucket", 4), default_ttft_s=args.ttft_s,
        default_tpot_s=args.tpot_ms / 1000, idle_whole_samples=idle_samples,
        finetune_unit=unit, slot_headroom=headroom, cheapest_bucket=not smallest,
        safety=getattr(args, "safety", 0.9),
        latency_model_dir=getattr(args, "latency_dir", None),
        xla_options=getattr(args, "xla_options", None) or "",
        unroll_layers=getattr(args, "unroll_layers", None))


def mode_error(mode: str) -> str | None:
    """Why ``mode`` is no mode to run (None: it is one): the engine's check of
    ``engine_mode(mode)``, made before any run."""
    try:
        parse_mode(engine_mode(mode))
    except ValueError as e:
        return f"{e}, or one of {', '.join(COSERVE_VARIANTS)}"
    return None


def finetune_job(model, seed: int = 0, max_len: int = 256) -> FinetuneJob:
    """A job that outlasts any run: random-letter samples of mixed lengths, 16 tokens up to
    the engine's training length (one character is one token of the byte tokenizer)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    records = [{"text": "".join(rng.choice(letters, size=int(n)))}
               for n in rng.integers(16, max_len - 1, 256)]
    data = from_records(records, model.tokenizer, DataConfig(max_seq_len=max_len))
    return FinetuneJob("bench", data, lora=LoraConfig(r=16, lora_alpha=32,
                                                      target_modules=("q_proj", "v_proj",
                                                                      "down_proj")),
                       optimizer=OptimizerConfig(learning_rate=1e-4), sequences_per_step=8,
                       max_steps=10**6, seed=seed)


def trace_seconds(rate: float, args) -> float:
    """Seconds of trace of a run at ``rate``: ``args.duration``, or longer at a rate too low
    for that to hold ``args.min_requests`` requests on average."""
    floor = getattr(args, "min_requests", 0) / rate if rate > 0 else 0.0
    return max(args.duration, floor)


def arrival_times(rate: float, args, seed: int, duration: float) -> np.ndarray:
    if rate <= 0:
        return np.zeros(0)
    if getattr(args, "arrivals", "poisson") == "gamma":
        return gamma_arrivals(rate, args.gamma_cv, duration, seed)
    return poisson_arrivals(rate, duration, seed)


def longest_request(args) -> int:
    """The longest prompt, and the longest output, of the benchmark's requests (tokens)."""
    return int(0.4 * getattr(args, "max_model_len", 512))


def run_one(model, mode: str, rate: float, args, finetune: bool | None = None,
            seed: int | None = None) -> dict:
    """Drives one engine for ``trace_seconds`` of trace; returns a record.
    ``finetune`` (default: every mode but inference-only) submits the benchmark's job.
    ``seed`` (default ``args.seed``) draws the trace: arrivals, lengths and prompts."""
    engine = Engine(model, engine_config(mode, args))
    engine.warmup(progress=False)
    measured = dict(engine.latency.times)  # (adapted online from here on)
    slowdown = engine.speed_probe()  # against the benchmark's one latency measurement
    engine.latency.errors.clear()  # from here: the run's own predictions
    during = keep_against_measured(engine.latency, measured)
    finetune = mode != "inference-only" if finetune is None else finetune
    if finetune:
        engine.submit_job(finetune_job(model, max_len=engine.trainer.config.max_len))
        run = engine.trainer.jobs["bench"]
    slo = SLO(args.ttft_s, args.tpot_ms / 1000)
    seed = args.seed if seed is None else seed
    duration = trace_seconds(rate, args)
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(rate, args, seed, duration)
    longest = longest_request(args)
    prompt_lens, output_lens = sharegpt_lengths(len(arrivals), seed, scale=args.scale,
                                                max_prompt=longest, max_output=longest)
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in prompt_lens]
    refused, out_tokens, metrics = 0, 0, []
    ft_tokens_at_end = None
    counts = engine.counters.copy()  # (replaced by the totals at the trace's end)
    stolen_before = cpu_steal()
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
        if now >= duration:
            if ft_tokens_at_end is None:
                ft_tokens_at_end = run.tokens_trained if finetune else 0
                counts = engine.counters.copy()
            if not (engine.running or engine.waiting) or now > duration + args.drain:
                break
        busy = engine.running or engine.waiting or (finetune and now < duration)
        if not busy:
            time.sleep(max(0.0, min(arrivals[i] - now if i < len(arrivals) else 0.01, 0.01)))
            continue
        for out in engine.step():
            if time.monotonic() - start <= duration:
                out_tokens += len(out.new_token_ids)
            if out.finished:
                metrics.append(out.metrics)
    stolen = steal_share(stolen_before, cpu_steal())
    unfinished = len(engine.running) + len(engine.waiting)
    n = len(metrics) + refused + unfinished
    slowdown_after = None
    if getattr(args, "probe_after", False):  # against the same measurement as before
        adapted, engine.latency.times = engine.latency.times, measured
        slowdown_after = engine.speed_probe()
        engine.latency.times = adapted
    attained = sum(m.slo_attained for m in metrics)
    ttft = np.array([m.ttft_s for m in metrics]) if metrics else np.zeros(1)
    tpot = np.array([m.tpot_s for m in metrics]) if metrics else np.zeros(1)
    # Observed / predicted device seconds of the steps and pieces the engine timed (none
    # when it timed none: whole samples are not priced by the latency model).
    errors = np.array([error for _, error in engine.latency.errors])
    error = {f"prediction_error_p{q}": float(np.percentile(errors, q)) for q in (50, 90)
             if len(errors)}
    return {
        "mode": mode, "rate": rate, "seed": seed, "duration_s": duration,
        "requests": n, "refused": refused, "unfinished": unfinished,
        "slo_attainment": attained / n if n else 1.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99)),
        "inference_tokens_per_s": out_tokens / duration,
        "ft_tokens_per_s": ft_tokens_at_end / duration,
        "host_fraction": (counts["host_s"] / counts["iteration_s"]
                          if counts["iteration_s"] else 0.0),
        # Share of the trace's wall time spent in engine iterations (the rest was idle).
        "busy_fraction": counts["iteration_s"] / duration,
        # What the trace's inference would have taken as steps of its own (the latency
        # model's prediction), as a share of the trace: the time it left to finetuning.
        "inference_alone_fraction": counts["inference_alone_s"] / duration,
        "mean_batch": counts["inference_rows"] / max(counts["inference_steps"], 1),
        # The share of the finetuning tokens trained in whole samples, run whole or in
        # parts (the rest went through windows and backward pieces).
        "sample_token_share": (counts["sample_tokens"] / counts["train_tokens"]
                               if counts["train_tokens"] else 0.0),
        "steps": engine.counters["steps"], "mixed_steps": engine.counters["mixed_steps"],
        "whole_samples": engine.counters["whole_samples"],
        # Iterations running a part of a sample run in parts (FinetuneConfig.sample_segments).
        "sample_parts": engine.counters["sample_parts"],
        # Iterations planned while requests waited for a sequence slot.
        "slot_waits": engine.counters["slot_waits"],
        "finetune_unit": engine.finetune_unit if mode.startswith("coserve") else None,
        # Padding steps' observed / predicted seconds just before the trace (the prediction
        # is the latency model measured when the benchmark began): > 1, the machine had
        # slowed since then.
        "machine_slowdown": slowdown,
        # The same after the trace (``args.probe_after``; None: not probed).
        "machine_slowdown_after": slowdown_after,
        # During it: the share of the steps and pieces observed at more than SLOW_STEP times
        # their measured time (None: none observed).
        "slow_step_share": (float(np.mean(np.array(during) > SLOW_STEP)) if during
                            else None),
        # The share of the host's CPU time its hypervisor gave other guests during the trace
        # (None: not known here). Under 1% on a quiet VM.
        "steal_share": stolen,
    } | error


MAX_STEAL = 0.05
"""A run during which the hypervisor gave other guests more than this share of the host's CPU
time is run again (``run_calm``). On this project's 2-core VM (2026-12-06, 442 runs
of ``bench/attainment_pairs.py``) the runs with under 1% stolen kept a median attainment of
100%, those with 5-8% 98.4%, those with 12% or more 59.4%: a co-tenant's phase, which no
mode can do anything about, decided them."""


def run_calm(model, mode: str, rate: float, args, seed: int | None = None,
             log=print) -> dict:
    """``run_one``, run again up to ``args.steal_retries`` times (default none) while the
    host's CPU time stolen during the run exceeds ``args.max_steal`` (``MAX_STEAL``); the
    last try is kept either way, with ``tries`` and ``calm`` (False: kept although stolen
    from) in its record."""
    retries = getattr(args, "steal_retries", 0)
    limit = getattr(args, "max_steal", MAX_STEAL)
    for attempt in range(1 + retries):
        rec = run_one(model, mode, rate, args, seed=seed)
        steal = rec.get("steal_share")
        calm = steal is None or steal <= limit
        if calm:
            break
        log(f"  {mode_label(mode)} @ {rate:g} req/s (seed {seed}): host CPU time stolen "
            f"{steal:.1%}" + (", run again" if attempt < retries else ", kept"))
    rec["tries"], rec["calm"] = attempt + 1, calm
    return rec


SLOW_STEP = 1.5
"""An observed step or piece past this many times its measured time ran in a slow phase of
the machine (``slow_step_share``): the noise of a step of a few milliseconds stays within it
(``Engine.speed_probe``: 20%), a co-tenant's phase does not (2-3x on this project's 2-core VM,
2026-12-06)."""


def keep_against_measured(latency, measured: dict[str, float]) -> list[float]:
    """Makes ``latency`` also keep, for every observation of a shape in ``measured`` (the table
    as measured, before serving adapts it), its seconds over the measured ones, and returns
    that list as it fills: the machine's speed during a run, which ``machine_slowdown`` gives
    only before it. (Each shape's prediction follows its observations, so the latency model's
    own errors do not show a phase that lasts.)"""
    ratios: list[float] = []
    observe = latency.observe

    def observe_and_keep(key: str, seconds: float) -> None:
        if measured.get(key):
            ratios.append(seconds / measured[key])
        observe(key, seconds)

    latency.observe = observe_and_keep
    return ratios


def pool_rounds(recs: list[dict]) -> dict:
    """One record from a (mode, rate)'s rounds: counts summed, attainment over all their
    requests, throughputs and percentiles averaged; ``rounds`` keeps each round's
    attainment and finetuning throughput (their spread is the machine's noise)."""
    if len(recs) == 1:
        return dict(recs[0], rounds=1)
    counts = ("requests", "refused", "unfinished", "steps", "mixed_steps", "whole_samples",
              "sample_parts", "slot_waits")
    out = {"mode": recs[0]["mode"], "rate": recs[0]["rate"],
           "finetune_unit": recs[0].get("finetune_unit")}
    out |= {k: sum(r.get(k, 0) for r in recs) for k in counts}
    attained = sum(r["slo_attainment"] * r["requests"] for r in recs)
    out["slo_attainment"] = attained / out["requests"] if out["requests"] else 1.0
    for k in dict.fromkeys(k for r in recs for k in r):
        values = [r[k] for r in recs if isinstance(r.get(k), float)]
        if k not in out and values:
            out[k] = float(np.mean(values))
    slowdowns = [r["machine_slowdown"] for r in recs if r.get("machine_slowdown")]
    if slowdowns:
        out["machine_slowdown"] = max(slowdowns)  # the slowest round's
        out["machine_slowdown_min"] = min(slowdowns)  # and the fastest's
    out["reruns"] = sum(r.get("tries", 1) - 1 for r in recs)  # ``run_calm``'s
    out["uncalm"] = sum(not r.get("calm", True) for r in recs)  # kept although stolen from
    out["rounds"] = len(recs)
    out["round_attainment"] = [r["slo_attainment"] for r in recs]
    out["round_ft_tokens_per_s"] = [r["ft_tokens_per_s"] for r in recs]
    out["round_seeds"] = [r.get("seed") for r in recs]
    return out


# ----- the scale-free regime --------------------------------------------------------------


def decode_tpot(model, args, requests: int = 4, prompt_len: int = 32,
                output_len: int = 64) -> float:
    """Inference-only's decode TPOT on this machine: the median TPOT of ``requests`` requests
    served one at a time (no queueing, no batching), each ``output_len`` tokens long."""
    engine = Engine(model, engine_config("inference-only", args))
    engine.warmup(progress=False)
    rng = np.random.default_rng(args.seed)
    tpots = []
    for _ in range(requests):
        engine.add_request(rng.integers(3, 259, size=prompt_len).tolist(),
                           cj.SamplingParams(max_tokens=output_len, ignore_eos=True),
                           slo=SLO(1e9, 1e9))
        while engine.has_unfinished():
            tpots += [o.metrics.tpot_s for o in engine.step() if o.finished]
    return float(np.median(tpots))


def calibrate_tpot_target(model, args) -> float:
    """Sets ``args.tpot_ms`` to ``args.tpot_multiple`` times inference-only's decode TPOT
    (``decode_tpot``, measured with no SLO) and returns that TPOT in seconds."""
    tpot = decode_tpot_now(model, args)
    args.tpot_ms = args.tpot_multiple * tpot * 1e3
    return tpot


def decode_tpot_now(model, args) -> float:
    """Inference-only's decode TPOT measured now (``decode_tpot``, with no SLO), leaving
    ``args.tpot_ms`` as it was."""
    target_ms, args.tpot_ms = args.tpot_ms, 1e6
    try:
        return decode_tpot(model, args)
    finally:
        args.tpot_ms = target_ms


def multiple_line(target_s: float, before_s: float | None, after_s: float) -> str:
    """What the TPOT target meant: its multiple of inference-only's decode TPOT measured
    before the runs (``before_s``; None: not measured) and after them (``after_s``). A shared
    machine's speed moves within an hour, so one target in ms is one regime at one hour and
    another the next: on the tiny tier, 2026-12-06, the decode TPOT was 3.1 ms at 09:14 UTC
    and 3.7-7.7 ms between 11:00 and 11:35, which made the 9.4 ms target of a 3x run
    anything from 1.2x to 2.5x."""
    before = ("" if before_s is None else
              f"{target_s / before_s:.2f}x inference-only's decode TPOT before the runs "
              f"({before_s * 1e3:.2f} ms) and ")
    return (f"regime: the TPOT target {target_s * 1e3:.1f} ms was {before}"
            f"{target_s / after_s:.2f}x the decode TPOT measured after them "
            f"({after_s * 1e3:.2f} ms)")


def find_peak(model, args, attainment: float = 0.95, start: float = 2.0,
              bisections: int = 2, log=print) -> tuple[float, list[dict]]:
    """The highest arrival rate at which inference-only keeps ``attainment``: doubling from
    ``start`` until it fails, then ``bisections`` halvings of the bracket, then the rate found
    judged again with as many traces more, new to it (the confirmation). A probe runs
    ``args.rounds`` traces (from seed ``args.seed`` on, the seeds after those its rate has
    run) and is judged on every trace its rate has run, pooled, as every figure at that rate
    is judged later: a peak found on one trace can be far past what inference-only keeps on
    the next (on the tiny tier, 2026-12-03: 1 of 30 requests late on one trace, 10 of 43 on
    the next). A probe that fails, by few enough requests that chance could have made it
    (``could_be_chance``), runs as many traces again and is judged on all of them pooled: a
    failure ends the doubling or halves the bracket, so one resting on a few late requests
    moves the peak by half or more (on the tiny tier, 2026-12-06: 5 of 56 late at 4 req/s gave
    a peak of 3.5 req/s, where the run an hour before, on other traces, held 95% up to 14).

    The confirmation: the bisection's highest held rate is the likeliest to sit on the cliff
    where the engine saturates, which one trace's quiet stretches can let through (on the
    small tier at 4x, 2026-12-07: 2.5 req/s held on one probe trace, 100.0%, and
    inference-only then kept 78.6%, 28.1% and 98.0% on three traces). Where the rate fails
    on the new traces, the search starts again below it with every probe judged on twice the
    traces (halving down from it, then ``bisections`` halvings of the bracket), and the rate
    it finds is the peak. Returns the rate and every probe's record."""
    probes = []
    rounds = args.rounds
    ran: dict[float, list[dict]] = {}  # rate -> every trace run at it

    def ok(rate: float, traces: int, what: str = "") -> bool:
        """Whether ``rate`` keeps ``attainment`` on at least ``traces`` traces, pooled."""
        done = ran.setdefault(rate, [])

        def more(n: int) -> None:
            new = [run_calm(model, "inference-only", rate, args, seed=args.seed + len(done) + i,
                            log=log) for i in range(n)]
            done.extend(new)
            probes.extend(new)

        more(max(0, traces - len(done)))
        pooled = pool_rounds(done)
        line = (f"  peak probe {rate:7.2f} req/s{what}: inference-only attainment "
                f"{_missed(pooled)}" + ("" if len(done) == 1 else f" over {len(done)} traces"))
        if pooled["slo_attainment"] < attainment and could_be_chance(pooled, attainment):
            more(rounds)
            pooled = pool_rounds(done)
            line += f"; with {rounds} more, {_missed(pooled)}"
        log(line)
        return pooled["slo_attainment"] >= attainment

    def search(lo: float, hi: float, traces: int) -> float:
        """The highest rate held on ``traces`` traces, bracketed by ``lo``, which held (0:
        none yet: halving down from ``hi`` finds one), and ``hi``, which failed."""
        while lo == 0.0:
            if hi < 2e-3:
                raise RuntimeError("inference-only misses the SLO even at a trickle")
            if ok(hi / 2, traces):
                lo = hi / 2
            else:
                hi /= 2
        for _ in range(bisections):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid, traces) else (lo, mid)
        return lo

    lo, hi = 0.0, start
    while ok(hi, rounds):
        lo, hi = hi, hi * 2
        if hi > 4096:
            raise RuntimeError("inference-only meets the SLO at every rate tried")
    peak = search(lo, hi, rounds)
    if ok(peak, len(ran[peak]) + rounds, " (confirming, new traces)"):
        return peak, probes
    return search(0.0, peak, 2 * rounds), probes


def fraction_rates(peak: float, fractions) -> list[float]:
    """The arrival rates at ``fractions`` of ``peak`` (rounded: they name the runs)."""
    return [round(f * peak, 6) for f in fractions]


def could_be_chance(record: dict, attainment: float, level: float = 0.01) -> bool:
    """Whether a run that kept less than ``attainment`` might have missed as many requests by
    chance at that attainment: as many or more misses among its requests have a binomial
    probability of at least ``level`` where each misses with ``1 - attainment`` (5 of 56 at
    95%: 0.15; 10 of 64: 0.001; 276 of 400: nothing). Misses bunch in bursts, so the chance
    is larger than that, never smaller: a failure past it is the load's."""
    n = record.get("requests") or 0
    missed = round((1 - record["slo_attainment"]) * n)
    # P(X >= missed) for X ~ Binomial(n, 1 - attainment): the survival function past missed - 1.
    return bool(binom.sf(missed - 1, n, 1 - attainment) >= level)


def separate_cluster(records: list[dict], rates: list[float], ft_only: float,
                     peak: float | None = None) -> list[dict]:
    """FlexLLM's normalised separate-cluster baseline from inference-only runs at lambda/f;
    ``ft_only``: the finetuning cluster's tokens/s on the whole machine (the fastest way
    this machine finetunes)."""
    by_rate = {round(r["rate"], 6): r for r in records if r["mode"] == "inference-only"}
    out = []
    for rate in rates:
        for f in SEPARATE_FRACTIONS:
            inf = by_rate[round(rate / f, 6)]
            rec = {k: inf[k] for k in ("slo_attainment", "ttft_p50_s", "ttft_p99_s",
                                       "tpot_p50_s", "tpot_p99_s")}
            rec |= {"mode": f"separate:{int(f * 100)}%", "rate": rate,
                    "inference_tokens_per_s": inf["inference_tokens_per_s"] * f,
                    "ft_tokens_per_s": (1 - f) * ft_only}
            if peak:
                rec["rate_fraction"] = round(rate / peak, 4)
            out.append(rec)
    return out


def _best(rivals: list[dict]) -> dict | None:
    return max(rivals, key=lambda r: r["ft_tokens_per_s"], default=None)


SLOWDOWN_FLAG = 1.15
"""A run whose probe steps took this many times as long as when the benchmark measured its
latency model, or less than its inverse, is named in the report: its figures come from a
slower machine than the others', or its latency model from a slower one than its own (which
prices every unit of work dear, so the scheduler plans less than fits)."""


def _fastest(record: dict) -> float:
    """A record's fastest round's ``machine_slowdown`` (a pooled record keeps both ends)."""
    return record.get("machine_slowdown_min", record["machine_slowdown"])


def drift_lines(records: list[dict], flag: float = SLOWDOWN_FLAG) -> list[str]:
    """The machine's speed over the runs (``machine_slowdown``), naming those slowed past
    ``flag`` and those faster than ``1 / flag`` (a pooled record carries its slowest and
    fastest rounds')."""
    probed = [r for r in records if r.get("machine_slowdown")]
    if not probed:
        return []
    line = (f"machine speed: before each run, padding steps took "
            f"{min(map(_fastest, probed)):.2f}-"
            f"{max(r['machine_slowdown'] for r in probed):.2f}x their time when the latency "
            f"model was measured; ")

    def named(runs, key):
        return ", ".join(f"{mode_label(r['mode'])} @ {r['rate']:g} ({key(r):.2f}x)"
                         for r in runs)

    slowed = [r for r in probed if r["machine_slowdown"] > flag]
    sped = [r for r in probed if _fastest(r) < 1 / flag]
    found = []
    if slowed:
        found.append(f"past {flag:g}x (figures from a slower machine than the rest): "
                     + named(slowed, lambda r: r["machine_slowdown"]))
    if sped:
        found.append(f"below {1 / flag:.2f}x (a latency model measured on a slower machine "
                     f"than the run's: it priced the work dear): " + named(sped, _fastest))
    if not found:
        return [line + f"no run past {flag:g}x or below {1 / flag:.2f}x"]
    return [line + "; ".join(found)]


def steal_line(runs: list[dict], limit: float = MAX_STEAL) -> str:
    """How many of ``runs`` (records, pooled or not, and peak probes) ran again for the CPU
    time the host lost to other guests (``run_calm``), and which were kept although more
    than ``limit`` of it was stolen."""
    again = sum(r["reruns"] if "reruns" in r else (r.get("tries") or 1) - 1 for r in runs)
    kept = [f"{mode_label(r['mode']) if 'mode' in r else 'peak probe'} @ {r['rate']:g}"
            for r in runs if r.get("uncalm") or r.get("calm") is False]
    return (f"host CPU time stolen: {again} run(s) run again past {limit:.0%} stolen"
            + ("" if not kept else "; kept although stolen from: " + ", ".join(kept)))


def busy_fraction(record: dict) -> float:
    """The share of the wall time a run's engine spent in iterations (1 where unrecorded)."""
    return min(1.0, record.get("busy_fraction", 1.0))


def compute_bound(inference_only: dict, ft_only: float, tpot_target_s: float) -> float:
    """Finetuning tokens/s co-serving could reach at this rate if no compute were free;
    ``ft_only``: the machine's fastest finetune-only tokens/s.

    Inference-only is busy ``busy_fraction`` of the wall time (1 where unrecorded), its
    iterations each taking about its median TPOT (every iteration decodes every running
    request); co-serving may finetune through the idle rest and stretch the iterations to
    the TPOT target, so at most ``1 - busy * TPOT / target`` of the machine's time is left
    to finetuning. Where a step is compute-bound (a CPU from a batch of about 8) a
    finetuning token costs what it costs in finetune-only, and this bound holds; where
    decode leaves compute idle (a GPU) finetuning tokens ride in the step for less, and
    co-serving can pass it. It prices a stretched iteration at inference-only's TPOT,
    though its batch is larger (Little's law: as many more requests are present as the
    iterations are longer), which on a compute-bound machine costs more: ``compare`` names
    beside it the time coserve's inference left as measured (``inference_alone_fraction``;
    on the tiny tier at half of peak, 2026-12-06: 64% at a batch of 5.1, where this bound
    assumed 45%).
    """
    busy = busy_fraction(inference_only)
    return ft_only * max(0.0, 1.0 - busy * inference_only["tpot_p50_s"] / tpot_target_s)


def time_split(co: dict, inf: dict, ft_token: float, ft_whole: float | None) -> str:
    """What a coserve run's finetuning had to work with: the share of the wall time its
    inference would have taken as steps of their own (the latency model's prediction, at
    coserve's batches: iterations stretched by finetuning keep each request longer, so more
    run at once, and a compute-bound step grows with its batch), inference-only's share at
    its own batches, and the finetuning tokens/s made in the rest of the time (against
    finetune-only's, whole samples and token-level: the unit sets the rate)."""
    left = 1.0 - co["inference_alone_fraction"]
    whole = f", {ft_whole:.0f} in whole samples" if ft_whole else ""
    made = (f"in the {left:.0%} left its finetuning made {co['ft_tokens_per_s'] / left:.0f} "
            f"tok/s" if left >= 0.05 else  # (a rate over a sliver of time says nothing)
            f"it left {max(left, 0.0):.0%} of the time, within the prediction's error")
    return (f"coserve's inference alone would have taken {co['inference_alone_fraction']:.0%} "
            f"of the time at a mean batch of {co['mean_batch']:.1f} sequences "
            f"(inference-only's {inf['inference_alone_fraction']:.0%} at "
            f"{inf['mean_batch']:.1f}); {made}, {co['sample_token_share']:.0%} of its "
            f"finetuning tokens in whole samples ({co.get('sample_parts', 0)} iterations "
            f"ran parts of samples; finetune-only {ft_token:.0f} tok/s token-level{whole})")


def compare(records: list[dict], rates: list[float], ft_only: float,
            on_gpu: bool = False, tpot_target_s: float | None = None,
            ft_whole: float | None = None) -> list[str]:
    """Lines checking issue #12's targets at each rate (fractions of peak when known).
    ``ft_whole``: whole-sample finetune-only tokens/s, where it was measured: the compute
    bound is taken at the faster of the two (as the separate splits are)."""
    lines = []
    if ft_whole:
        lines.append(f"finetune-only: {ft_only:.0f} tok/s token-level, {ft_whole:.0f} tok/s in "
                     f"whole samples ({ft_whole / max(ft_only, 1e-9):.2f}x: the token-level "
                     f"backward recomputes each layer's forward)")
    ceiling = max(ft_only, ft_whole or 0.0)
    units = sorted({r["finetune_unit"] for r in records
                    if r["mode"] == "coserve" and r.get("finetune_unit")})
    if units:
        lines.append(f"coserve finetuned by {' and '.join(units)} (finetune_unit auto: the unit "
                     f"the latency model prices lower per token)")
    separate_target = 1.9 if on_gpu else 1.0
    for rate in rates:
        at = {r["mode"]: r for r in records if round(r["rate"], 6) == round(rate, 6)}
        co, inf = at.get("coserve"), at.get("inference-only")
        if co is None or inf is None:
            continue
        frac = co.get("rate_fraction")
        where = f"rate {rate:g}" + ("" if frac is None else f" ({frac:g} of peak)")
        if inf["slo_attainment"] >= 0.95:
            ok = co["slo_attainment"] >= 0.95
            lines.append(f"{where}: inference-only {_missed(inf)}, coserve {_missed(co)} -> "
                         f"{'OK' if ok else 'MISSED'} (>= 95%)")
        bound = compute_bound(inf, ceiling, tpot_target_s) if tpot_target_s else None
        # The same measured where the bound assumes: the stretched iterations' batches are
        # larger, and on a compute-bound machine cost more than inference-only's (see
        # time_split). None where the run did not measure its inference's time.
        left = (ceiling * max(0.0, 1.0 - co["inference_alone_fraction"])
                if "inference_alone_fraction" in co else None)
        if bound is not None:
            lines.append(
                f"{where}: compute bound {bound:.0f} tok/s ({bound / max(ceiling, 1e-9):.0%} "
                f"of the fastest finetune-only: inference-only busy "
                f"{busy_fraction(inf):.0%} of the time, its TPOT p50 "
                f"{inf['tpot_p50_s'] * 1e3:.1f} ms of the {tpot_target_s * 1e3:.1f} ms "
                f"target); coserve reaches "
                f"{co['ft_tokens_per_s'] / max(bound, 1e-9):.0%} of it")
        if "inference_alone_fraction" in co and "inference_alone_fraction" in inf:
            lines.append(f"{where}: {time_split(co, inf, ft_only, ft_whole)}")
        need = needed_attainment(co)
        half_up = frac is None or frac >= 0.5
        for prefix, label, factor in (
                ("separate", "separate split", separate_target),
                ("temporal-seq", "temporal-seq (FlexLLM's baseline)", 2.0 if half_up else None),
                ("temporal:", f"temporal ({ABLATION})", 1.1 if half_up else None),
                (TOKEN_UNIT, "coserve by tokens (windows and pieces)", None)):
            rivals = [r for m, r in at.items() if m.startswith(prefix)]
            best = _best([r for r in rivals if r["slo_attainment"] >= need])
            if best is None:
                if rivals:
                    # The ratio is still reported, against the rival that came closest.
                    near = max(rivals, key=lambda r: r["slo_attainment"])
                    ratio = co["ft_tokens_per_s"] / max(near["ft_tokens_per_s"], 1e-9)
                    lines.append(f"{where}: no {label} variant reaches {need:.1%} attainment "
                                 f"(best {near['mode']} at {near['slo_attainment']:.1%}, "
                                 f"{near['ft_tokens_per_s']:.0f} tok/s); coserve finetunes "
                                 f"{ratio:.2f}x as much at its higher attainment")
                continue
            ratio = co["ft_tokens_per_s"] / max(best["ft_tokens_per_s"], 1e-9)
            beside = at.get(BESIDE + best["mode"])
            if beside is not None:
                lines.append(
                    f"{where}: coserve run again beside {best['mode']} (after the rounds, "
                    f"on the same traces): {beside['ft_tokens_per_s']:.0f} tok/s at "
                    f"{beside['slo_attainment']:.1%} attainment = "
                    f"{beside['ft_tokens_per_s'] / max(best['ft_tokens_per_s'], 1e-9):.2f}x it")
            verdict = ("reported" if factor is None
                       else ("OK" if ratio >= factor else "MISSED") + f" (>= {factor}x)")
            if bound is not None and factor is not None and ratio < factor:
                # What bounds a miss, as multiples of this rival: the finetuning the time
                # inference leaves could give at finetune-only's speed, and all of the
                # machine finetuning at its fastest.
                rival = max(best["ft_tokens_per_s"], 1e-9)
                verdict += f"; the compute bound allows {bound / rival:.2f}x"
                if left is not None:
                    verdict += (f", the time coserve's inference left at its batches "
                                f"{left / rival:.2f}x")
                verdict += f", the whole machine finetuning {ceiling / rival:.2f}x"
            lines.append(f"{where}: coserve finetuning {co['ft_tokens_per_s']:.0f} tok/s = "
                         f"{ratio:.2f}x best {label}, {best['mode']} at "
                         f"{best['slo_attainment']:.0%} -> {verdict}; coserve keeps "
                         f"{co['ft_tokens_per_s'] / max(ft_only, 1e-9):.0%} of finetune-only")
    return lines


def mode_label(mode: str) -> str:
    return f"{mode} ({ABLATION})" if mode.startswith("temporal:") else mode


def _missed(r: dict) -> str:
    """Attainment, with how many of how many requests missed where the record counts them
    (a few requests move a short run's attainment by points)."""
    if not r.get("requests"):
        return f"{r['slo_attainment']:.1%}"
    missed = round((1 - r["slo_attainment"]) * r["requests"])
    return f"{r['slo_attainment']:.1%} ({missed} of {r['requests']} missed)"


def _attainment(r: dict) -> str:
    """Pooled attainment, and each round's when there were several."""
    rounds = r.get("round_attainment")
    each = "" if not rounds else " (" + "/".join(f"{a:.0%}" for a in rounds) + ")"
    return f"{r['slo_attainment']:.1%}{each}"


def _prediction_error(r: dict) -> str:
    """How far the latency model's predictions were off in a run (rounds averaged)."""
    if "prediction_error_p50" not in r:
        return ""
    return f"{r['prediction_error_p50']:.2f}/{r['prediction_error_p90']:.2f}"


def table(records: list[dict], ft_only: float) -> str:
    head = ("| mode | rate (req/s) | of peak | SLO attainment | TTFT p50/p99 (s) "
            "| TPOT p50/p99 (ms) | inference tok/s | finetuning tok/s | share of finetune-only "
            "| host time | observed / predicted p50/p90 |")
    rows = [head, "|" + "---|" * 11]
    for r in sorted(records, key=lambda r: (r["rate"], r["mode"])):
        frac = r.get("rate_fraction")
        rows.append(
            f"| {mode_label(r['mode'])} | {r['rate']:.3g} | "
            f"{'' if frac is None else f'{frac:g}'} | {_attainment(r)} | "
            f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_s'] * 1e3:.1f}/{r['tpot_p99_s'] * 1e3:.1f} | "
            f"{r['inference_tokens_per_s']:.0f} | {r['ft_tokens_per_s']:.0f} | "
            f"{r['ft_tokens_per_s'] / max(ft_only, 1e-9):.0%} | "
            f"{r.get('host_fraction', 0):.1%} | {_prediction_error(r)} |")
    return "\n".join(rows)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["mode"] for r in records}):
        pts = sorted((r.get("rate_fraction", r["rate"]), r["slo_attainment"],
                      r["ft_tokens_per_s"]) for r in records if r["mode"] == mode)
        style = "--" if mode.startswith("separate") else "-"
        label = mode_label(mode)
        ax1.plot([p[0] for p in pts], [p[1] * 100 for p in pts], style, marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
    ax1.set(xlabel="arrival rate (fraction of peak)", ylabel="SLO attainment (%)",
            ylim=(0, 105))
    ax2.set(xlabel="arrival rate (fraction of peak)", ylabel="finetuning tokens/s")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


TIERS = ("tiny", "small", "llama3-8b", "tiny-8b-like")
DEVICE_TIERS = {"llama3-8b": "bfloat16", "tiny-8b-like": "float32"}
"""Tiers built on the device with random weights (``bench/engine_throughput.py``'s shapes):
``llama3-8b`` for a GPU, ``tiny-8b-like`` its code path at small shapes, for a CPU run
before a GPU one."""


LENGTH_SCALES = {"small": 0.1}
"""The ShareGPT length scale of a tier where it is not the default 0.25 (``--scale``): the
small tier's decode step is about 25 times the tiny tier's, and at 0.25 its requests (mean
output about 85 tokens) live about 20 s at a 3x TPOT target, which makes the peak below 1
req/s and a ``--quick`` run's traces minutes long (2026-12-07: the decode TPOT and the peak
search's first two probes took 15 minutes). At 0.1 (mean output 34 tokens) a request lives
6-9 s at the small tier's targets so far (170-285 ms), as every small-tier figure in
BENCHMARKS.md has it."""


def length_scale(args) -> float:
    """``args.scale``, or the tier's default (``LENGTH_SCALES``) where none was given."""
    if getattr(args, "scale", None) is not None:
        return args.scale
    return LENGTH_SCALES.get(getattr(args, "tier", "tiny"), 0.25)


def fit_buckets_to_tier(args) -> None:
    """A ``DEVICE_TIERS`` engine compiles one sequence-count and one page-width bucket: 8
    step programs, not 72 (at 8B shapes on an H200, 2026-12-04, compiling all 72 did not
    end within two minutes)."""
    if args.tier in DEVICE_TIERS:
        args.min_seq_bucket = 16
        args.min_page_bucket = getattr(args, "max_model_len", 512) // 16


def tier_model(tier: str, path: str | None):
    """The model of a tier: ``tiny`` is the embedded model, ``small`` random weights with
    SmolLM2-135M's shapes (generated and cached the same way), the ``DEVICE_TIERS`` random
    weights made on the device, with the embedded model's byte-level tokenizer (the
    finetuning job's texts need one; its ids are valid in any larger vocabulary)."""
    if path:
        return cj.load_model(path, progress=False)
    if tier in DEVICE_TIERS:
        import engine_throughput
        import jax.numpy as jnp

        tokenizer = cj.load_model(cj.tiny_model_dir(), progress=False).tokenizer
        return engine_throughput.random_weight_model(
            engine_throughput.SHAPES[tier][0](), jnp.dtype(DEVICE_TIERS[tier]),
            tokenizer=tokenizer)
    from coserve_jax.tiny_model import small_model_dir

    return cj.load_model(cj.tiny_model_dir() if tier == "tiny" else small_model_dir(),
                         progress=False)


def fit_to_model(args) -> None:
    """Run lengths in the model's own time: a request admitted at the end of the trace
    needs its TTFT target plus its output at the TPOT target to finish within its SLO, so
    the drain allows the longest output that long; and unless ``--duration`` was given,
    the trace lasts at least five mean request lifetimes (a slow model's requests live
    long: at 6 s, few would finish inside the trace)."""
    tpot_s = args.tpot_ms / 1000
    longest = longest_request(args)
    args.drain = max(args.drain, args.ttft_s + longest * tpot_s)
    if not getattr(args, "duration_given", True):
        args.duration = max(args.duration, 5 * SHAREGPT_MEAN_OUTPUT * args.scale * tpot_s)


def save_partial(args, regime: dict, records: list[dict]) -> None:
    """Writes the runs so far to ``--json`` (``"complete": false``), so that a run killed
    at a time limit (a lent GPU's call) still leaves its finished runs' records; the
    finished benchmark overwrites the file."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"regime": regime, "records": records, "complete": False}, f, indent=1)


def needed_attainment(co: dict) -> float:
    """The attainment a rival must keep to be compared with coserve's record ``co``: coserve's
    own, or 95% where coserve kept more (issue #12: the best variant "that reaches the same
    attainment")."""
    return min(0.95, co["slo_attainment"])


def longer_periods(model, args, rounds: dict[tuple[str, float], list[dict]],
                   rates: list[float], log=print, after_run=lambda: None) -> list[str]:
    """Where none of the run's ``temporal-seq`` variants kept coserve's attainment
    (``needed_attainment``) at a rate, runs FlexLLM's next period there
    (``FLEXLLM_PERIODS``, 64 to 512, those not run yet), in ``args.rounds`` rounds on the
    rounds' own traces, until one keeps it: the checks compare coserve with the best variant
    that does, and the quick run's ``:64`` and ``:dynamic`` often keep none at a tight target
    or at the peak. Beside each such run, on its trace, coserve runs again (``BESIDE``).
    Adds the runs to ``rounds`` (``after_run`` after each) and returns the periods as
    "mode @ rate". Runs nothing where the run has no ``temporal-seq`` variant or no coserve
    (``--modes``), or with ``--no-longer-periods``."""
    added = []
    if not getattr(args, "longer_periods", True):
        return added
    for rate in rates:
        co = rounds.get(("coserve", rate))
        ran = [m for m, r in rounds if r == rate and m.startswith("temporal-seq")]
        if not co or not ran:
            continue
        need = needed_attainment(pool_rounds(co))
        for period in FLEXLLM_PERIODS:
            if any(pool_rounds(rounds[m, rate])["slo_attainment"] >= need for m in ran):
                break
            mode = f"temporal-seq:{period}"
            if mode in ran:
                continue
            beside = BESIDE + mode
            rounds[mode, rate], rounds[beside, rate] = [], []
            for i in range(args.rounds):
                # coserve again on the same trace, right before or after the period's run
                # (alternating): the rounds ran minutes ago, on a machine that may have
                # changed speed since.
                pair = [(mode, mode), ("coserve", beside)]
                for run_mode, key in pair if i % 2 == 0 else pair[::-1]:
                    rec = run_calm(model, run_mode, rate, args, seed=args.seed + i, log=log)
                    rounds[key, rate].append(rec | {"mode": key})
                    after_run()
                    log(f"{key:>40} @ {rate:6.2f} req/s (round {i + 1}; no variant run "
                        f"before kept {need:.1%}): attainment {rec['slo_attainment']:.1%}, "
                        f"finetuning {rec['ft_tokens_per_s']:.0f} tok/s")
            ran.append(mode)
            added.append(f"{mode} @ {rate:g}")
    return added


def run_regime(model, args, log=print) -> tuple[list[dict], dict]:
    """The whole benchmark: calibrate the SLO, find the peak, run every mode at every
    fraction of it. Returns the records (separate splits included) and the regime."""
    regime = {"xla_options": args.xla_options, "unroll_layers": args.unroll_layers}
    if args.tpot_ms is None:
        tpot = calibrate_tpot_target(model, args)
        regime["decode_tpot_ms"] = tpot * 1e3
        log(f"inference-only decode TPOT {tpot * 1e3:.1f} ms -> TPOT target "
            f"{args.tpot_ms:.1f} ms ({args.tpot_multiple:g}x)")
    regime["tpot_ms"] = args.tpot_ms
    fit_to_model(args)
    if args.rates:
        rates = list(args.rates)
        peak = None
    elif args.peak:
        peak = args.peak
        regime["peak_given"] = True
        log(f"peak rate given (no search): {peak:.2f} req/s")
        rates = fraction_rates(peak, args.fractions)
    else:
        peak, probes = find_peak(model, args, bisections=args.peak_bisections, log=log)
        kept = ("rate", "seed", "requests", "slo_attainment", "machine_slowdown",
                "steal_share", "tries", "calm")
        regime["peak_probes"] = [{k: p.get(k) for k in kept} for p in probes]
        if peak <= 0:
            raise RuntimeError("no rate keeps inference-only at 95% attainment")
        log(f"peak rate (inference-only keeps 95% attainment): {peak:.2f} req/s")
        rates = fraction_rates(peak, args.fractions)
    regime["peak_rate"] = peak
    records = [run_calm(model, "finetune-only", 0.0, args, log=log)]
    records[0]["rate_fraction"] = 0.0
    ft_only = records[0]["ft_tokens_per_s"]
    regime["ft_only_tokens_per_s"] = ft_only
    log(f"finetune-only: {ft_only:.0f} finetuning tokens/s")
    # With nothing to serve every temporal-seq iteration is a whole sample.
    whole = run_calm(model, "temporal-seq:64", 0.0, args, log=log)
    records.append(whole | {"mode": WHOLE_SAMPLES, "rate_fraction": 0.0})
    regime["ft_whole_tokens_per_s"] = whole["ft_tokens_per_s"]
    log(f"{WHOLE_SAMPLES}: {whole['ft_tokens_per_s']:.0f} finetuning tokens/s")
    runs = [(m, r) for r in rates for m in args.modes]
    if args.separate:
        runs += [("inference-only", round(r / f, 6)) for r in rates for f in SEPARATE_FRACTIONS]
    runs = list(dict.fromkeys(runs))
    rounds: dict[tuple[str, float], list[dict]] = {run: [] for run in runs}
    traces = args.rounds * sum(trace_seconds(rate, args) for _mode, rate in runs)
    log(f"{len(runs)} runs x {args.rounds} rounds: {traces / 60:.0f} minutes of traces")

    def save() -> None:  # every run finished so far, after each run
        save_partial(args, regime, records + [r for rs in rounds.values() for r in rs])

    for i in range(args.rounds):
        # Interleaved rounds, every other one in reverse order: a machine whose speed
        # drifts over minutes weighs on every mode alike. Every mode of a round runs the
        # round's own trace. The peak probes are not reused here: they ran minutes before,
        # and inference-only at the peak is what the attainment check holds coserve to.
        seed = args.seed + i
        for mode, rate in runs if i % 2 == 0 else runs[::-1]:
            rec = run_calm(model, mode, rate, args, seed=seed, log=log)
            rounds[mode, rate].append(rec)
            save()
            log(f"{mode_label(mode):>40} @ {rate:6.2f} req/s (round {i + 1}): attainment "
                f"{rec['slo_attainment']:.1%}, finetuning {rec['ft_tokens_per_s']:.0f} tok/s")
    regime["longer_periods"] = longer_periods(model, args, rounds, rates, log=log,
                                              after_run=save)
    for (_mode, rate), recs in rounds.items():
        rec = pool_rounds(recs)
        if peak:
            rec["rate_fraction"] = round(rate / peak, 4)
        records.append(rec)
    shown = [r for r in records if r["rate"] == 0
             or any(round(r["rate"], 6) == round(x, 6) for x in rates)]
    # The finetuning cluster runs as fast as this machine finetunes (see separate_cluster).
    if args.separate:
        shown += separate_cluster(records, rates, max(ft_only, whole["ft_tokens_per_s"]), peak)
    regime["rates"] = rates
    regime["steal"] = steal_line(records + regime.get("peak_probes", []),
                                 getattr(args, "max_steal", MAX_STEAL))
    return shown, regime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="short runs (about 10-12 minutes on 2 CPU cores; longer where the peak "
                        "rate is low, as traces hold --min-requests requests)")
    p.add_argument("--tier", choices=TIERS, default="tiny",
                   help="tiny: the embedded model; small: SmolLM2-135M shapes, random weights; "
                        "llama3-8b: Llama-3.1-8B shapes, random bfloat16 weights (a GPU); "
                        "tiny-8b-like: that code path at small shapes (a CPU check)")
    p.add_argument("--fractions", type=float, nargs="+",
                   help="arrival rates as fractions of the peak (default 0.25 0.5 1 with "
                        "--quick, 0.25 0.5 0.75 1 otherwise)")
    p.add_argument("--rates", type=float, nargs="+",
                   help="absolute rates (req/s) instead of fractions of a measured peak")
    p.add_argument("--modes", nargs="+", help="modes besides finetune-only")
    p.add_argument("--duration", type=float, help="seconds of trace per run")
    p.add_argument("--drain", type=float, help="seconds to finish stragglers")
    p.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--gamma-cv", type=float, default=2.0,
                   help="gamma arrivals' coefficient of variation (BurstGPT-like bursts: 2)")
    p.add_argument("--ttft-s", type=float, default=2.0, help="TTFT target (s)")
    p.add_argument("--tpot-multiple", type=float, default=3.0,
                   help="TPOT target as a multiple of inference-only's decode TPOT")
    p.add_argument("--tpot-ms", type=float, help="a fixed TPOT target instead (ms)")
    p.add_argument("--peak-bisections", type=int, help="bisection steps of the peak search")
    p.add_argument("--peak", type=float,
                   help="the peak rate an earlier run found on this machine, model and TPOT "
                        "multiple (req/s): skips the search, and the JSON says it was given")
    p.add_argument("--backward-block", type=int, default=0,
                   help="EngineConfig.backward_block (0: whole-sequence backward pieces)")
    p.add_argument("--min-token-bucket", type=int, default=16,
                   help="the smallest step token bucket (a decode step of fewer sequences "
                        "is padded to it; on a CPU the padding rows cost compute)")
    p.add_argument("--keep-projections", action="store_true",
                   help="FinetuneConfig.keep_projections: backward pieces reuse the forward's "
                        "projection outputs instead of recomputing them")
    p.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                   help="run the inference-only rates the separate-cluster splits need "
                        "(--no-separate: a comparison of modes alone, in less time)")
    p.add_argument("--xla-options", default="",
                   help="KernelConfig.xla_options ('name=value,...')")
    p.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction,
                   help="KernelConfig.unroll_layers (default: by backend)")
    p.add_argument("--safety", type=float, default=0.9,
                   help="share of a target an iteration is planned to fill (SchedulingConfig)")
    p.add_argument("--scale", type=float,
                   help="ShareGPT length scale (default 0.25; 0.1 on the small tier)")
    p.add_argument("--seed", type=int, default=0,
                   help="trace seed of the first round (round i runs seed + i)")
    p.add_argument("--min-requests", type=int,
                   help="a run's trace lasts long enough to hold this many requests on "
                        "average, longer than --duration at low rates (default 20 with "
                        "--quick, 40 otherwise)")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds of every run, pooled (default 2 with --quick, "
                        "3 otherwise): the machine's drift weighs on every mode alike")
    p.add_argument("--steal-retries", type=int, default=2,
                   help="times a run is run again while the host's hypervisor gives other "
                        "guests more than --max-steal of its CPU time during it (the last "
                        "try is kept, and the report names it)")
    p.add_argument("--max-steal", type=float, default=MAX_STEAL,
                   help="share of the host's CPU time stolen that spoils a run")
    p.add_argument("--longer-periods", action=argparse.BooleanOptionalAction, default=True,
                   help="where no temporal-seq variant run keeps coserve's attainment at a "
                        "rate, run FlexLLM's other periods there (64 to 512) in turn until "
                        "one does, each run beside a coserve run on its trace")
    p.add_argument("--model", help="model directory (overrides --tier)")
    p.add_argument("--json", help="write the records here as a JSON list")
    p.add_argument("--plot", help="PNG path (default bench/out/coserve-<tier>.png)")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    for mode in args.modes or ():
        if (error := mode_error(mode)) is not None:  # a clear error before any run
            p.error(f"--modes: {error}")
    args.scale = length_scale(args)
    args.fractions = args.fractions or ([0.25, 0.5, 1.0] if args.quick
                                        else [0.25, 0.5, 0.75, 1.0])
    args.modes = args.modes or list(QUICK_MODES if args.quick else FULL_MODES)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.min_requests = (args.min_requests if args.min_requests is not None
                         else (20 if args.quick else 40))
    args.duration_given = args.duration is not None
    args.duration = args.duration or (6.0 if args.quick else 20.0)
    args.drain = args.drain if args.drain is not None else (5.0 if args.quick else 10.0)
    args.peak_bisections = (args.peak_bisections if args.peak_bisections is not None
                            else (2 if args.quick else 4))
    args.plot = args.plot or os.path.join(ROOT, "bench", "out", f"coserve-{args.tier}.png")
    model = tier_model(args.tier, args.model)
    fit_buckets_to_tier(args)

    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    started = time.monotonic()
    # The latency model is measured afresh for this run (every engine of it shares that
    # measurement): one saved by an earlier run was taken on a machine as fast as it was then.
    args.latency_dir = scratch_dir("coserve-bench-latency-")
    shown, regime = run_regime(model, args)
    ft_only = regime["ft_only_tokens_per_s"]
    text = table(shown, ft_only)
    checks = compare(shown, regime["rates"], ft_only, on_gpu, args.tpot_ms / 1e3,
                     regime.get("ft_whole_tokens_per_s")) + drift_lines(shown)
    if args.steal_retries:
        checks.append(regime["steal"])
    if regime["longer_periods"]:
        checks.append("temporal-seq periods added where no variant run kept coserve's "
                      "attainment (after the rounds, on their traces, each beside coserve "
                      "run again): "
                      + ", ".join(regime["longer_periods"]))
    before = regime.get("decode_tpot_ms")
    after = decode_tpot_now(model, args)
    regime["decode_tpot_after_ms"] = after * 1e3
    checks.append(multiple_line(args.tpot_ms / 1e3, before and before / 1e3, after))
    print(text)
    print("\n".join(checks))
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"regime": regime, "records": shown, "complete": True}, f, indent=1)
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot([r for r in shown if r["rate"] > 0], args.plot)
    print(f"plot: {args.plot}")
    if not args.no_record:
        peak = regime["peak_rate"]
        record(f"coserve ({args.tier} tier): scheduling modes side by side", {
            "machine": machine_line(),
            "commit": library_revision(),
            "model": f"{args.tier} tier ({model.config.num_layers} layers, hidden "
                     f"{model.config.hidden_size}, vocab {model.config.vocab_size})",
            "regime": (f"TPOT target {args.tpot_ms:.1f} ms"
                       + (f" = {args.tpot_multiple:g}x decode TPOT "
                          f"{regime['decode_tpot_ms']:.1f} ms" if "decode_tpot_ms" in regime
                          else "")
                       + f", TTFT {args.ttft_s:g} s; peak "
                       + (f"{peak:.2f} req/s" if peak else "not measured (fixed rates)")
                       + f"; {args.arrivals} arrivals"
                       + (f" (cv {args.gamma_cv:g})" if args.arrivals == "gamma" else "")
                       + f", {args.rounds} interleaved rounds of {args.duration:.3g} s per "
                       f"run or {args.min_requests} requests' worth where longer (pooled), "
                       f"trace seeds {args.seed}-{args.seed + args.rounds - 1} (one per "
                       f"round), backward pieces "
                       + (f"of {args.backward_block}-token blocks" if args.backward_block
                          else "over whole sequences")
                       + (" reusing the forward's projections" if args.keep_projections
                          else "")
                       + f", token buckets from {args.min_token_bucket}, ShareGPT lengths "
                       f"x{args.scale:g}; finetune-only {ft_only:.0f} tok/s"),
            "took": f"{time.monotonic() - started:.0f} s"},
            text + "\n\n" + "\n".join(f"- {c}" for c in checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
