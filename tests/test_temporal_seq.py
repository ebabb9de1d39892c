"""FlexLLM's temporal-sharing baseline (``temporal-seq``): each finetuning iteration runs one
whole sample, its forward and its backward through every layer, with no inference tokens."""

from __future__ import annotations

import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, SamplingParams
from coserve_jax.finetune.data import Dataset
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.policy import Policy, parse_mode

from support import engine_grads, random_sequence, relative_error, tiny_model, whole_sequence_grads


def test_parse_temporal_seq_modes():
    assert parse_mode("temporal-seq:64") == ("temporal-seq", 64)
    assert parse_mode("temporal-seq:dynamic") == ("temporal-seq", None)
    for bad in ("temporal-seq:0", "temporal-seq:", "temporal-seq:x", "temporalseq:4"):
        with pytest.raises(ValueError, match="temporal-seq:N"):
            parse_mode(bad)
    policy = Policy("temporal-seq:4")
    assert policy.whole_samples and not Policy("temporal:4").whole_samples
    # Every 4th iteration while inference waits; every iteration when it does not.
    picks = [policy.finetune_iteration(True, True, 0.1) for _ in range(8)]
    assert picks == [False, False, False, True] * 2
    assert policy.finetune_iteration(False, True, None)
    # Outside its finetuning iterations it never adds token-level work.
    assert policy.forward_tokens(finetune_iteration=False, inference_running=False,
                                 tokens_left=64, time_limit=None, step_seconds=lambda n: 0.0,
                                 piece_seconds=0.0) == 0
    assert policy.backward_seconds(finetune_iteration=False, inference_running=False,
                                   tokens_left=64, time_limit=None, step_seconds=0.0) == 0.0


@pytest.mark.parametrize("length,serve", [(23, False), (41, True)])
def test_whole_sample_gradients_equal_whole_sequence_jax_grad(length, serve):
    """What one temporal-seq iteration accumulates is the gradient of the whole sequence."""
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(length), length)
    adapter, got, engine = engine_grads(model, seq, window=8, backward_layers=1, serve=serve,
                                        mode="temporal-seq:2")
    assert engine.counters["whole_samples"] == 1 and engine.counters["backward_pieces"] == 0
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")


def test_each_finetuning_iteration_is_one_whole_sample_without_inference():
    model = tiny_model()
    rng = np.random.default_rng(7)
    lengths = [9, 30, 17, 25, 12, 33]
    seqs = [random_sequence(rng, n) for n in lengths]
    engine = Engine(model, EngineConfig.flat(
        page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16,
        min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_train_seqs=1,
        max_train_len=64, train_window=8, max_lora_rank=8, mode="temporal-seq:3"))
    job = FinetuneJob("t", Dataset(seqs), lora=LoraConfig(r=4, lora_alpha=8),
                      sequences_per_step=2, max_steps=3)
    engine.submit_job(job)
    run = engine.trainer.jobs["t"]
    for i in range(3):
        engine.add_request(rng.integers(3, 259, size=6 + 5 * i).tolist(),
                           SamplingParams(max_tokens=12, ignore_eos=True))
    finetune_iterations = inference_iterations = 0
    since_finetune = 0
    while engine.has_unfinished():
        done, trained = run.seqs_done, run.tokens_trained
        inference_waiting = bool(engine.running or engine.waiting)
        steps = engine.num_steps
        engine.step()
        info = engine.last_step
        if engine.num_steps == steps and not info.finetune_iteration:
            # A call that ran no step and no sample, only handed out tokens (those of the
            # step before a finetuning iteration, which the next call runs, or the last
            # step's): not an iteration of the period.
            assert info.inference_tokens == 0 and info.bucket is None
            assert run.seqs_done == done and run.tokens_trained == trained
            continue
        if info.finetune_iteration:
            finetune_iterations += 1
            # Exactly one sample, all its tokens, forward and backward, nothing else.
            assert info.inference_tokens == 0 and info.bucket is None
            assert info.whole_samples == 1 and info.backward_pieces == 0
            assert run.seqs_done == done + 1
            assert run.tokens_trained - trained == info.finetune_tokens
            assert info.finetune_tokens in lengths
            if inference_waiting:  # the period holds while inference is served
                assert since_finetune == 2
            since_finetune = 0
        else:
            inference_iterations += 1
            since_finetune += 1
            assert info.finetune_tokens == 0 and info.backward_pieces == 0
            assert info.whole_samples == 0
            assert run.seqs_done == done and run.tokens_trained == trained
    assert finetune_iterations == 6 and run.step == 3 and run.state == "completed"
    assert inference_iterations > 0 and engine.counters["train_tokens"] == sum(lengths)
    assert len(run.losses) == 3 and all(np.isfinite(run.losses))


def test_idle_coserve_iterations_run_whole_samples():
    """coserve with idle_whole_samples: an iteration with nothing to serve (and no sequence
    in flight at token level) runs one whole sample; with requests it co-serves by tokens;
    when the requests are gone the sequences in flight finish and no new one starts at
    token level, so the idle iterations go back to whole samples."""
    model = tiny_model()
    rng = np.random.default_rng(3)
    # Long samples and a short request: sequences are still in flight when it finishes.
    lengths = [40, 61, 35, 52, 47, 58, 44, 39]
    engine = Engine(model, EngineConfig.flat(
        page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16,
        min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_train_seqs=2,
        max_train_len=64, train_window=8, max_lora_rank=8, idle_whole_samples=True))
    engine.submit_job(FinetuneJob("t", Dataset([random_sequence(rng, n) for n in lengths]),
                                  lora=LoraConfig(r=4, lora_alpha=8), sequences_per_step=4,
                                  max_steps=2))
    run = engine.trainer.jobs["t"]
    engine.step()
    info = engine.last_step
    assert info.whole_samples == 1 and info.inference_tokens == 0
    assert info.finetune_tokens in lengths and run.seqs_done == 1
    engine.add_request(rng.integers(3, 259, size=12).tolist(),
                       SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    info = engine.last_step
    assert info.whole_samples == 0 and info.inference_tokens == 12
    token_level = False
    while engine.running or engine.waiting:
        engine.step()
        token_level |= bool(run.inflight)
    assert token_level, "the request's iterations co-serve sequences at token level"
    idle_whole = 0
    while run.state == "running":
        before = list(run.inflight)
        engine.step()
        assert all(any(f is g for g in before) for f in run.inflight), "a new token-level start"
        if not before:
            assert engine.last_step.whole_samples == 1
            idle_whole += 1
    assert idle_whole >= 2 and not run.inflight
    assert len(run.losses) == 2 and all(np.isfinite(run.losses))
    assert engine.counters["train_tokens"] == sum(lengths)
