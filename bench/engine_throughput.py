"""Engine throughput: decode and prefill tokens/s, side by side with a reference.

Default (CPU) mode runs the embedded tiny Llama (``coserve_jax.tiny_model_dir()``)
through the engine and through transformers ``generate`` in one process and
prints ratios, since absolute figures on a shared machine are noisy:

    python bench/engine_throughput.py            # full run, appends to BENCHMARKS.md
    python bench/engine_throughput.py --quick --no-record
    python bench/engine_throughput.py --cpus 1   # a loaded shared machine: pin both to 1 CPU

``--shapes llama3-8b`` is meant for a GPU: it builds Llama-3.1-8B shapes with
random bfloat16 weights on the device (no checkpoint) and holds decode step
time against the memory floor (bytes read per step over measured copy
bandwidth) and prefill against the matmul floor (FLOPs over measured matmul
FLOP/s). ``--shapes tiny-8b-like`` runs that same path with small sizes, to
check the code on CPU; such figures are labelled as a code-path check.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The repository root, for a machine where the project is not installed (a lent GPU).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import coserve_jax  # noqa: E402
from coserve_jax import Engine, EngineConfig, Model, ModelConfig, SamplingParams  # noqa: E402
from coserve_jax.config import RopeConfig  # noqa: E402
from coserve_jax.models.llama import LayerParams, Params  # noqa: E402
from coserve_jax.slo import SLO  # noqa: E402

from benchlib import copy_bandwidth, library_revision, markdown_table, matmul_flops, record  # noqa: E402

# ----- shared helpers ------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """CPU model, core count, jax backend and device kind, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    info = {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} used)",
        "jax backend": f"{jax.default_backend()} ({device.device_kind}, {jax.device_count()} dev)",
        "versions": f"jax {jax.__version__}, python {platform.python_version()}",
        "coserve_jax": library_revision(),
    }
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info




def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (``fn`` must block)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_prompts(rng: np.random.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
    # Ids from 3 up: the tiny model's specials (pad, bos, eos) are 0..2.
    return rng.integers(3, vocab, (n, length)).tolist()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----- CPU part: the tiny model, coserve vs transformers ---------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuSizes:
    decode_batches: tuple[int, ...] = (1, 16)
    decode_prompt_len: int = 8
    decode_tokens: int = 64
    prefill_prompts: int = 8
    prefill_len: int = 256
    repeats: int = 5


class CoserveSide:
    """The engine (default EngineConfig, every bucket compiled up front)."""

    def __init__(self, model: Model, config: EngineConfig):
        self.engine = Engine(model, config)
        self.engine.warmup(progress=False)

    def decode(self, prompts: list[list[int]], n: int) -> None:
        self.engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

    def prefill(self, prompts: list[list[int]]) -> None:
        self.decode(prompts, 1)


class TransformersSide:
    """transformers in float32: greedy ``generate`` with its KV cache, one batched forward."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def decode(self, prompts: list[list[int]], n: int) -> None:
        # Equal-length prompts: no padding, so left-padding questions never arise.
        ids = self.torch.tensor(prompts)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=self.torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,  # masks EOS: the counterpart of ignore_eos
                pad_token_id=0,
            )
        assert out.shape[1] == ids.shape[1] + n

    def prefill(self, prompts: list[list[int]]) -> None:
        with self.torch.inference_mode():  # the engine also computes last-token logits only
            self.model(input_ids=self.torch.tensor(prompts), logits_to_keep=1)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, after one warm call each, run in turn every round.

    Interleaving makes every function see the same load on a shared machine.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_rates(
    sides: dict[str, CoserveSide | TransformersSide], sizes: CpuSizes, vocab: int
) -> dict[str, dict[str, float]]:
    """``{metric: {side: tokens/s}}``.

    Decode time is t(generate N tokens) - t(generate 1 token), so prefill and
    per-call setup are left out: (N - 1) decode steps per prompt, on both sides.
    """
    rng = np.random.default_rng(0)
    n = sizes.decode_tokens
    rates = {}
    for batch in sizes.decode_batches:
        prompts = random_prompts(rng, batch, sizes.decode_prompt_len, vocab)
        fns = {}
        for name, side in sides.items():
            fns[f"{name} 1"] = functools.partial(side.decode, prompts, 1)
            fns[f"{name} N"] = functools.partial(side.decode, prompts, n)
        t = interleaved_medians(fns, sizes.repeats)
        metric = f"decode b={batch}, {sizes.decode_prompt_len}-tok prompts, {n} new"
        rates[metric] = {
            name: batch * (n - 1) / (t[f"{name} N"] - t[f"{name} 1"]) for name in sides
        }
    prompts = random_prompts(rng, sizes.prefill_prompts, sizes.prefill_len, vocab)
    fns = {name: functools.partial(side.prefill, prompts) for name, side in sides.items()}
    t = interleaved_medians(fns, sizes.repeats)
    metric = f"prefill {sizes.prefill_prompts}x{sizes.prefill_len} tok"
    rates[metric] = {name: len(prompts) * sizes.prefill_len / t[name] for name in sides}
    return rates


def run_cpu(args: argparse.Namespace) -> None:
    sizes = CpuSizes()
    if args.quick:
        sizes = CpuSizes(decode_tokens=32, prefill_prompts=4, repeats=3)
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    info = machine_info()
    cpus = len(os.sched_getaffinity(0))
    if cpus > 1 and os.getloadavg()[0] > cpus:
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} exceeds the {cpus} CPUs in use; "
            "torch's OpenMP threads stall when oversubscribed, try --cpus 1"
        )
    path = coserve_jax.tiny_model_dir()
    model = coserve_jax.load_model(path, dtype="float32", progress=False)
    mc = model.config
    info["model"] = (
        f"{os.path.basename(path)} ({mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"{mc.num_heads}/{mc.num_kv_heads} heads, vocab {mc.vocab_size}, float32)"
    )
    config = EngineConfig()  # the defaults: 128-token budget, 16 sequences, max_model_len 2048
    print(f"tiny model: {path}\n{sizes}\n{config}\ncompiling and measuring ...", flush=True)
    sides = {"coserve": CoserveSide(model, config), "transformers": TransformersSide(path)}
    rates = cpu_rates(sides, sizes, model.config.vocab_size)

    import torch
    import transformers

    info["versions"] += f", torch {torch.__version__}, transformers {transformers.__version__}"
    info["torch threads"] = str(torch.get_num_threads())
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        [
            metric,
            f"{r['coserve']:,.0f}",
            f"{r['transformers']:,.0f}",
            f"{r['coserve'] / r['transformers']:.2f}",
        ]
        for metric, r in rates.items()
    ]
    header = [
        "metric (tiny Llama, float32, greedy)",
        "coserve tok/s",
        "transformers tok/s",
        "coserve / transformers",
    ]
    table = markdown_table(header, rows)
    print("\n" + table + "\n")
    notes = (
        f"Median of {sizes.repeats} rounds after a warm-up, coserve and transformers "
        "interleaved in every round. Decode tok/s = batch x (N - 1) / (t(generate N) - "
        "t(generate 1)), i.e. prefill excluded, for both. Engine: default EngineConfig, so "
        "prefill runs in chunks of max_num_batched_tokens=128; transformers prefill is one "
        "batched forward with logits_to_keep=1."
    )
    print(notes)
    if not args.no_record:
        record(
            "engine_throughput: tiny Llama on CPU, coserve vs transformers",
            info,
            table + "\n\n" + notes,
        )


# ----- shapes mode: Llama-3.1-8B shapes with random weights, against hardware floors ----------


def llama3_8b_config(num_layers: int = 32) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=num_layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(
            theta=500000.0,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    )


def tiny_8b_like_config(num_layers: int = 2) -> ModelConfig:
    """Llama-3.1-8B's proportions (GQA 4:1, MLP 3.5x, head_dim 64) at hidden 256."""
    return dataclasses.replace(
        llama3_8b_config(num_layers),
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=896,
        num_heads=4,
        num_kv_heads=1,
        head_dim=64,
        bos_token_id=None,
        eos_token_ids=(),
    )


@dataclasses.dataclass(frozen=True)
class ShapeSizes:
    """Workload of the shapes mode."""

    decode_batches: tuple[int, ...]
    decode_prompt_len: int
    warm_steps: int
    timed_steps: int
    prefill_prompts: int
    prefill_len: int
    max_num_batched_tokens: int
    copy_bytes: int  # array size of the bandwidth probe
    matmul_n: int  # matrix side of the FLOP/s probe
    repeats: int = 3


SHAPES = {
    "llama3-8b": (
        llama3_8b_config,
        ShapeSizes(
            decode_batches=(1, 16, 64, 256),
            decode_prompt_len=128,
            warm_steps=3,
            timed_steps=16,
            prefill_prompts=16,
            prefill_len=512,
            max_num_batched_tokens=2048,
            copy_bytes=4 << 30,
            matmul_n=8192,
        ),
    ),
    "tiny-8b-like": (
        tiny_8b_like_config,
        ShapeSizes(
            decode_batches=(1, 4, 16),
            decode_prompt_len=32,
            warm_steps=2,
            timed_steps=8,
            prefill_prompts=4,
            prefill_len=128,
            max_num_batched_tokens=128,
            copy_bytes=64 << 20,
            matmul_n=1024,
        ),
    ),
}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, std: float) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)


def random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> Params:
    """Random weights made on the device one leaf at a time (no host copy, no checkpoint)."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    nl, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size

    def normal(*shape: int) -> jax.Array:
        return _normal(next(keys), shape, dtype, 0.02)

    layers = LayerParams(
        input_norm=jnp.ones((nl, d), dtype),
        post_norm=jnp.ones((nl, d), dtype),
        q_proj=normal(nl, d, cfg.q_size),
        k_proj=normal(nl, d, cfg.kv_size),
        v_proj=normal(nl, d, cfg.kv_size),
        o_proj=normal(nl, cfg.q_size, d),
        gate_proj=normal(nl, d, f),
        up_proj=normal(nl, d, f),
        down_proj=normal(nl, f, d),
    )
    return Params(
        embed=normal(cfg.vocab_size, d),
        layers=layers,
        final_norm=jnp.ones((d,), dtype),
        lm_head=normal(d, cfg.vocab_size),
    )


def decode_context(sizes: ShapeSizes, batch: int, budget: int) -> int:
    """Longest sequence a decode measurement can reach (prompt and every token it samples).

    Requests prefilled early decode while later ones still prefill, for at most
    ceil(batch * prompt / (budget - batch)) + 1 steps.
    """
    prefill_steps = -(-batch * sizes.decode_prompt_len // max(budget - batch, 1)) + 1
    return sizes.decode_prompt_len + prefill_steps + sizes.warm_steps + sizes.timed_steps + 1


NO_SLO = SLO(1e9, 1e9)
"""Latency targets no step misses: a decode measurement's prefill runs at full chunks."""


def decode_step_time(
    engine: Engine,
    batch: int,
    sizes: ShapeSizes,
    rng: np.random.Generator,
    adapters: Sequence[str | None] = (None,),
    then: Callable[[Engine], object] | None = None,
) -> tuple[float, float]:
    """Median seconds of one steady decode step of ``batch`` sequences, and their mean context.

    Every request is prefilled first; a few untimed decode steps compile the
    bucket; max_tokens lets no request finish while timed. Request ``i`` uses adapter
    ``adapters[i % len(adapters)]`` (None: the base model). ``then(engine)``, if given,
    runs after the timed steps while every request is still decoding (a profile of the
    same steps, say).
    """
    vocab = engine.model.config.vocab_size
    max_tokens = engine.max_model_len - sizes.decode_prompt_len
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    # No latency targets: under the engine's default TPOT target the scheduler cuts prefill
    # chunks to what the decoding requests allow (seen on an H200 at 8B shapes, 2026-12-04),
    # so early requests decode for more steps than ``decode_context`` counts and reach
    # max_model_len before the timed steps.
    ids = [
        engine.add_request(p, params, adapter=adapters[i % len(adapters)], slo=NO_SLO)
        for i, p in enumerate(random_prompts(rng, batch, sizes.decode_prompt_len, vocab))
    ]
    try:
        started: set[str] = set()
        while len(started) < batch:  # prefill (the last prefill chunk yields the first token)
            started.update(out.request_id for out in engine.step())
        for _ in range(sizes.warm_steps):
            engine.step()
        # Tokens in the cache when timing starts, plus half the timed steps on average.
        mean_context = (sum(r.num_computed for r in engine.running) / batch
                        + sizes.timed_steps / 2)
        times = []
        for _ in range(sizes.timed_steps):
            start = time.perf_counter()
            outs = engine.step()  # blocks: the engine reads the sampled tokens back
            times.append(time.perf_counter() - start)
            if len(outs) != batch:  # the figure would not be a batch-``batch`` decode step
                contexts = sorted(r.num_computed for r in engine.running)
                raise RuntimeError(
                    f"decode b={batch}: a timed step returned {len(outs)} outputs "
                    f"({sum(o.finished for o in outs)} finished); {len(engine.running)} "
                    f"running, {len(engine.waiting)} waiting, contexts "
                    f"{contexts[:3]}..{contexts[-3:]}, max_model_len {engine.max_model_len}, "
                    f"timed step {len(times)}")
        if then is not None:
            then(engine)
    finally:  # a failed measurement leaves no requests behind for the next one
        for i in ids:
            engine.abort(i)
    return statistics.median(times), mean_context


def prefill_time(engine: Engine, sizes: ShapeSizes, rng: np.random.Generator) -> float:
    """Median seconds to prefill ``prefill_prompts`` prompts (max_tokens=1), after a warm run."""
    vocab = engine.model.config.vocab_size
    prompts = random_prompts(rng, sizes.prefill_prompts, sizes.prefill_len, vocab)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate(prompts, params)  # compiles the buckets it uses
    return median_time(lambda: engine.generate(prompts, params), sizes.repeats)


def decode_engine_config(sizes: ShapeSizes, kernels: str = "auto", max_adapters: int = 4,
                         max_lora_rank: int = 16, **fields) -> EngineConfig:
    """The decode measurements' engine: max_model_len just covers the workload, so the KV
    pages fit and every timed step uses one page-width bucket (compiled by the warm steps).
    ``fields``: more of the config (``EngineConfig.flat`` names)."""
    max_seqs = max(sizes.decode_batches)
    budget = max(sizes.max_num_batched_tokens, max_seqs)
    max_len = round_up(decode_context(sizes, max_seqs, budget), 16)
    return EngineConfig.flat(
        page_size=16,
        num_pages=max_seqs * max_len // 16 + 8,
        max_model_len=max_len,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        min_token_bucket=16,
        min_seq_bucket=4,
        max_adapters=max_adapters,
        max_lora_rank=max_lora_rank,
        kernels=kernels,
        **({} if max_adapters else {"max_train_seqs": 0}),  # finetuning needs a slot
        **fields,
    )


def prefill_engine_config(sizes: ShapeSizes, kernels: str = "auto") -> EngineConfig:
    """The prefill measurement's engine: every prompt fits, chunks of the token budget."""
    max_len = round_up(sizes.prefill_len + 1, 16)
    return EngineConfig.flat(
        page_size=16,
        num_pages=sizes.prefill_prompts * max_len // 16 + 8,
        max_model_len=max_len,
        max_num_seqs=max(4, sizes.max_num_batched_tokens // sizes.prefill_len),
        max_num_batched_tokens=sizes.max_num_batched_tokens,
        min_token_bucket=16,
        min_seq_bucket=4,
        kernels=kernels,
    )


def decode_bytes(model: Model, batch: int, mean_context: float) -> float:
    """Bytes a decode step must read: every weight once (but only ``batch`` embedding
    rows, so none of the table is counted) and each sequence's K and V in every layer."""
    params, cfg = model.params, model.config
    itemsize = jnp.dtype(model.dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(params.layers))
    head = params.lm_head.size + params.final_norm.size
    kv_per_token = 2 * cfg.num_layers * cfg.kv_size * itemsize  # K and V, all layers
    return (weights + head) * itemsize + batch * mean_context * kv_per_token


def prefill_flops(model: Model, sizes: ShapeSizes) -> float:
    """FLOPs of prefilling the prompts: 2 per matmul weight per token, causal attention,
    and the LM head on each prompt's last token."""
    params, cfg = model.params, model.config
    tokens = sizes.prefill_prompts * sizes.prefill_len
    layer_matmul = sum(
        getattr(params.layers, name).size
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    attention = 2 * cfg.num_layers * cfg.q_size * tokens * sizes.prefill_len  # QK^T + PV, causal
    return 2 * layer_matmul * tokens + attention + 2 * params.lm_head.size * sizes.prefill_prompts


def random_weight_model(cfg: ModelConfig, dtype: jnp.dtype, tokenizer=None) -> Model:
    """A model of ``cfg``'s shapes with random weights made on the device."""
    params = random_params(cfg, dtype)
    jax.block_until_ready(params)
    return Model(config=cfg, params=params, tokenizer=tokenizer, path="", dtype=dtype)


def run_shapes(args: argparse.Namespace) -> None:
    make_config, sizes = SHAPES[args.shapes]
    cfg = make_config(args.layers) if args.layers else make_config()
    if args.quick:
        sizes = dataclasses.replace(sizes, timed_steps=max(4, sizes.timed_steps // 2), repeats=2)
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    dtype = jnp.dtype(jnp.bfloat16)
    info = machine_info()
    backend = jax.default_backend()
    if backend == "cpu":  # keep the hardware probes short on a CPU
        sizes = dataclasses.replace(
            sizes, copy_bytes=min(sizes.copy_bytes, 256 << 20), matmul_n=min(sizes.matmul_n, 2048)
        )
    print(f"{args.shapes}: {cfg}\n{sizes}", flush=True)

    bandwidth = copy_bandwidth(sizes.copy_bytes, sizes.repeats)
    flops = matmul_flops(sizes.matmul_n, sizes.repeats)
    print(
        f"measured copy bandwidth {bandwidth / 1e9:,.1f} GB/s, "
        f"bf16 matmul {flops / 1e12:,.2f} TFLOP/s",
        flush=True,
    )

    model = random_weight_model(cfg, dtype)
    params = model.params
    kv_per_token = 2 * cfg.num_layers * cfg.kv_size * dtype.itemsize
    print(
        f"parameters {sum(x.size for x in jax.tree.leaves(params)) / 1e9:.3f} B, "
        f"KV {kv_per_token / 1024:.1f} KiB/token",
        flush=True,
    )

    rows = []
    engine = Engine(model, decode_engine_config(sizes))
    rng = np.random.default_rng(0)
    for batch in sizes.decode_batches:
        print(f"decode batch {batch} ...", flush=True)
        step, mean_context = decode_step_time(engine, batch, sizes, rng)
        floor = decode_bytes(model, batch, mean_context) / bandwidth
        rows.append(
            [
                f"decode b={batch} (ctx ~{mean_context:.0f})",
                f"{step * 1e3:.2f} ms",
                f"{batch / step:,.0f}",
                f"{floor * 1e3:.2f} ms (memory)",
                f"{floor / step:.1%}",
            ]
        )
    del engine

    tokens = sizes.prefill_prompts * sizes.prefill_len
    engine = Engine(model, prefill_engine_config(sizes))
    print("prefill ...", flush=True)
    elapsed = prefill_time(engine, sizes, rng)
    floor = prefill_flops(model, sizes) / flops
    rows.append(
        [
            f"prefill {sizes.prefill_prompts}x{sizes.prefill_len} tok",
            f"{elapsed * 1e3:.1f} ms",
            f"{tokens / elapsed:,.0f}",
            f"{floor * 1e3:.1f} ms (matmul)",
            f"{floor / elapsed:.1%}",
        ]
    )

    table = markdown_table(["metric", "measured", "tok/s", "floor", "floor / measured"], rows)
    label = f"--shapes {args.shapes}, {cfg.num_layers} layers, bf16 random weights"
    on_cpu = backend == "cpu"
    if on_cpu:
        label += " — CPU CODE-PATH CHECK, not GPU figures"
    notes = (
        f"Measured copy bandwidth {bandwidth / 1e9:,.1f} GB/s ({sizes.copy_bytes >> 20} MiB "
        f"bf16 x + 1), bf16 matmul {flops / 1e12:,.2f} TFLOP/s (n={sizes.matmul_n}). "
        f"Decode step = median of {sizes.timed_steps} steady steps after "
        f"{sizes.warm_steps} warm ones; memory floor = (weights + KV read) / bandwidth. "
        f"Prefill = median of {sizes.repeats} runs, chunks of "
        f"{sizes.max_num_batched_tokens} tokens."
    )
    print(f"\n{label}\n\n{table}\n\n{notes}")
    if not args.no_record:
        record(f"engine_throughput: {label}", info, table + "\n\n" + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        choices=sorted(SHAPES),
        help="random-weight shapes mode (GPU); default: tiny model vs transformers",
    )
    parser.add_argument("--layers", type=int, help="override the layer count of --shapes")
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument(
        "--cpus",
        type=int,
        help="pin the process to this many CPUs (both jax and torch size their thread pools "
        "from it); steadier ratios on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.cpus:  # before jax or torch start their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    if args.layers and not args.shapes:
        parser.error("--layers needs --shapes")
    if args.shapes:
        run_shapes(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
