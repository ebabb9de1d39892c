"""Shared helpers for tests: the embedded model, greedy references, compile counting, the
LoRA gradients of one training sequence through the engine and through jax.grad."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

import coserve_jax
from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, SamplingParams
from coserve_jax.finetune.data import Dataset, TrainSequence, labels_and_weights
from coserve_jax.latency import sample_key, sample_part_key
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.model import Model, adapter_weights, single_adapter_lora
from coserve_jax.models import llama

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
)


@functools.cache
def tiny_model() -> Model:
    return coserve_jax.load_model(coserve_jax.tiny_model_dir(), progress=False)


def greedy_reference(model: Model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the whole-sequence forward for every token."""
    tokens = list(prompt)
    for _ in range(n):
        logits = coserve_jax.forward_logits(model, [tokens])[0, -1]
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: an error relative to the scale of the reference."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@contextlib.contextmanager
def count_compilations():
    """Counts jaxpr traces and backend compilations inside the block: ``counts["n"]``."""
    counts = {"n": 0, "events": []}

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            counts["n"] += 1
            counts["events"].append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def random_adapter(name: str, cfg, r: int, seed: int) -> coserve_jax.LoraAdapter:
    """Non-zero A and B on all seven projections (B as large as a trained adapter's)."""
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_TARGETS)
    adapter = coserve_jax.LoraAdapter.zeros_b(name, lora, cfg, seed)
    rng = np.random.default_rng(seed)
    for m in ALL_TARGETS:
        adapter.b[m] = rng.normal(0, 0.05, adapter.b[m].shape).astype(np.float32)
    return adapter


def whole_sequence_grads(model, adapter, seq: TrainSequence):
    """jax.grad of the plain whole-sequence loss w.r.t. the adapter's A and B."""
    labels, weights = labels_and_weights(seq)
    tokens = jnp.asarray(seq.tokens, jnp.int32)[None]
    lora = single_adapter_lora(jnp.float32(adapter.config.scale))

    def loss(w):
        logits = llama.forward_dense(model.config, model.params, tokens, w, lora)[0]
        ce = jax.nn.logsumexp(logits, -1) - logits[jnp.arange(len(labels)), labels]
        return jnp.sum(ce * weights)

    return jax.grad(loss)(adapter_weights(adapter))


def random_sequence(rng, n: int) -> TrainSequence:
    tokens = rng.integers(3, 259, size=n).tolist()
    mask = [False] + [bool(x) for x in rng.random(n - 1) < 0.7]
    mask[-1] = True
    return TrainSequence(tuple(tokens), tuple(mask))


def engine_grads(model, seq, window: int, backward_layers: int, serve: bool, block: int = 256,
                 kernels: str = "auto", mode: str = "coserve", backward_block: int = 0,
                 keep_projections: bool = False, sample_segments: int | None = None):
    """Runs one sequence through the engine's windows and pieces (or, in a temporal-seq
    ``mode``, whole; with ``sample_segments``, in parts over that many segments of layers:
    coserve's whole-sample unit, whole samples priced too long to run beside requests);
    returns its LoRA grads."""
    parts = {} if sample_segments is None else dict(
        finetune_unit="samples", sample_segments=sample_segments, default_ttft_s=5.0)
    engine = Engine(model, EngineConfig.flat(
        page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16,
        min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_train_seqs=1,
        max_train_len=64, train_window=window, backward_layers=backward_layers,
        max_lora_rank=8, backward_attention_block=block, kernels=kernels, mode=mode,
        backward_block=backward_block, keep_projections=keep_projections, **parts))
    if sample_segments is not None:
        count = engine.trainer.sample_parts
        engine.latency.times |= {sample_key(n): 10.0 for n in engine.trainer.seq_buckets}
        engine.latency.times |= {sample_part_key(n, i, count): 0.01
                                 for n in engine.trainer.seq_buckets for i in range(count)}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS)
    # Two sequences per step and max_steps=1: the first sequence's gradients stay in
    # the accumulator (no optimizer step) for us to read.
    job = FinetuneJob("g", Dataset([seq, seq]), lora=lora, sequences_per_step=2, max_steps=1)
    engine.submit_job(job)
    trainer = engine.trainer
    run = trainer.jobs["g"]
    rng = np.random.default_rng(1)
    state = engine.runner.jobs["g"]  # the job's weights: set B to random values
    state.params = {m: {"a": p["a"], "b": jnp.asarray(rng.normal(0, 0.05, p["b"].shape),
                                                      jnp.float32)}
                    for m, p in state.params.items()}
    adapter = trainer.adapter_of(run)
    engine.registry.write(run.slot, adapter)
    if serve:  # inference tokens (base model and the adapter) share the steps
        for i, name in enumerate([None, "g", None]):
            engine.add_request(rng.integers(3, 259, size=5 + 7 * i).tolist(),
                               SamplingParams(max_tokens=6, ignore_eos=True), adapter=name)
    while run.seqs_done < 1:
        engine.step()
    buf = engine.runner.train
    r = lora.r
    got = {m: (np.asarray(buf.grad_a[m][:, run.slot, :, :r]),
               np.asarray(buf.grad_b[m][:, run.slot, :r, :])) for m in lora.target_modules}
    return adapter, got, engine
