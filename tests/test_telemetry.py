"""XLA traces with step annotations, and training/serving curves in TensorBoard files."""

from __future__ import annotations

import glob
import os

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coserve_jax import (
    DataConfig,
    Engine,
    EngineConfig,
    FinetuneJob,
    LoraConfig,
    SamplingParams,
    from_records,
)
from coserve_jax.finetune.data import synthetic_task

from support import tiny_model

CONFIG = dict(page_size=8, num_pages=128, max_num_seqs=8, max_num_batched_tokens=64,
              min_token_bucket=16, max_model_len=128, max_lora_rank=8, max_train_seqs=2,
              max_train_len=64, train_window=16, backward_layers=2, backward_pieces_per_step=2)


def _job(steps):
    data = from_records(synthetic_task("copy", 16, seed=0), tiny_model().tokenizer,
                        DataConfig(max_seq_len=64))
    return FinetuneJob("curves", data, lora=LoraConfig(r=4, lora_alpha=8), max_steps=steps,
                       sequences_per_step=2)


def test_trace_of_coserving_steps_has_step_annotations(tmp_path):
    # Compiling the first steps puts the request behind its TPOT target; spending banked
    # slack would then hold finetuning back until it caught up, past the traced steps.
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, spend_banked_slack=False))
    engine.submit_job(_job(100))
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):  # compile outside the trace
        engine.step()
    engine.start_profile(str(tmp_path), num_steps=4)
    for _ in range(6):
        engine.step()
    assert not engine.profiler.active
    traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert traces, os.listdir(tmp_path)
    with open(traces[0], "rb") as f:
        data = f.read()
    for needle in (b"coserve_step", b"coserve_forward bucket=T", b"decode=1", b"ft_fwd=",
                   b"coserve_backward seq="):
        assert needle in data, needle


def test_job_and_serving_scalars_in_event_files(tmp_path):
    # The engine is not warmed up, so its first iterations compile (seconds, with the
    # persistent cache off): an SLO loose enough for that keeps the attainment scalar's
    # expected value free of the machine's speed.
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, run_dir=str(tmp_path), log_every=5,
                                                    default_ttft_s=120.0, default_tpot_s=10.0))
    engine.submit_job(_job(6))
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    losses = events.Scalars("jobs/curves/loss")
    assert [e.step for e in losses] == list(range(1, 7))
    np.testing.assert_allclose([e.value for e in losses],
                               engine.job_progress("curves").losses, rtol=1e-6)
    for tag in ("jobs/curves/learning_rate", "jobs/curves/grad_norm",
                "jobs/curves/tokens_per_s", "serving/finetune_share", "serving/iteration_s"):
        assert events.Scalars(tag), tag
    assert events.Scalars("serving/slo_attainment")[-1].value == 1.0
