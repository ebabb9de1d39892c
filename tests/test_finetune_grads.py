"""Token-level finetuning gives exactly the gradients of the whole-sequence loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, SamplingParams
from coserve_jax.finetune.data import Dataset, TrainSequence, labels_and_weights
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.model import adapter_weights, single_adapter_lora
from coserve_jax.models import llama

from support import relative_error, tiny_model


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


def engine_grads(model, seq, window: int, backward_layers: int, serve: bool, block: int = 256):
    """Runs one sequence through the engine's windows and pieces; returns its LoRA grads."""
    engine = Engine(model, EngineConfig(
        page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16,
        min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_train_seqs=1,
        max_train_len=64, train_window=window, backward_layers=backward_layers,
        max_lora_rank=8, backward_attention_block=block))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS)
    # Two sequences per step and max_steps=1: the first sequence's gradients stay in
    # the accumulator (no optimizer step) for us to read.
    job = FinetuneJob("g", Dataset([seq, seq]), lora=lora, sequences_per_step=2, max_steps=1)
    engine.submit_job(job)
    trainer = engine.trainer
    run = trainer.jobs["g"]
    rng = np.random.default_rng(1)
    run.params = {m: {"a": p["a"], "b": jnp.asarray(rng.normal(0, 0.05, p["b"].shape),
                                                    jnp.float32)}
                  for m, p in run.params.items()}
    adapter = trainer.adapter_of(run)
    engine.registry.write(run.slot, adapter)
    if serve:  # inference tokens (base model and the adapter) share the steps
        for i, name in enumerate([None, "g", None]):
            engine.add_request(rng.integers(3, 259, size=5 + 7 * i).tolist(),
                               SamplingParams(max_tokens=6, ignore_eos=True), adapter=name)
    while run.seqs_done < 1:
        engine.step()
    buf = trainer.buffers
    r = lora.r
    got = {m: (np.asarray(buf.grad_a[m][:, run.slot, :, :r]),
               np.asarray(buf.grad_b[m][:, run.slot, :r, :])) for m in lora.target_modules}
    return adapter, got, engine


@pytest.mark.parametrize("length,window,backward_layers,serve,block", [
    (5, 7, 1, False, 256),    # shorter than one window
    (30, 7, 1, True, 256),    # several windows, one layer per piece, inference mixed in
    (30, 64, 2, False, 8),    # one window, two layers per piece, blocked attention
    (41, 16, 4, True, 16),    # the whole backward in one piece, blocked attention
])
def test_gradients_equal_whole_sequence_jax_grad(length, window, backward_layers, serve, block):
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(length), length)
    adapter, got, _ = engine_grads(model, seq, window, backward_layers, serve, block)
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")
