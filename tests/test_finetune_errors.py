"""Bad finetuning and adapter input is refused with a clear error; the engine keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coserve_jax import (
    DataConfig,
    Engine,
    EngineConfig,
    FinetuneJob,
    LoraAdapter,
    LoraConfig,
    SamplingParams,
    from_records,
    load_jsonl,
)
from coserve_jax.finetune.data import Dataset

from support import greedy_reference, tiny_model

CONFIG = EngineConfig.flat(page_size=4, num_pages=128, max_num_seqs=4, max_num_batched_tokens=32,
                           min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_lora_rank=8,
                           max_train_seqs=2, max_train_len=64)


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), CONFIG)


def _records(n=4):
    return [{"prompt": f"p{i}:", "completion": "ok"} for i in range(n)]


def _dataset(tok, records=None, max_seq_len=64):
    return from_records(records or _records(), tok, DataConfig(max_seq_len=max_seq_len))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_jsonl(str(path), tiny_model().tokenizer, DataConfig(max_seq_len=64))


def test_overlong_sequences_truncated_or_refused():
    tok = tiny_model().tokenizer
    long = [{"text": "x" * 100}]
    truncated = from_records(long, tok, DataConfig(max_seq_len=32))
    assert len(truncated[0].tokens) == 32 and truncated.num_truncated == 1
    with pytest.raises(ValueError, match="record 0"):
        from_records(long, tok, DataConfig(max_seq_len=32, overlong="refuse"))


def test_unknown_target_module_and_bad_rank():
    with pytest.raises(ValueError, match="unknown target module 'qkv_proj'"):
        LoraConfig(target_modules=("qkv_proj",))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=0)


def test_job_errors_leave_the_engine_serving(engine):
    model = tiny_model()
    tok = model.tokenizer
    prompt = [5, 9, 33, 70]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))

    with pytest.raises(ValueError, match="rank 16, above the slot maximum 8"):
        engine.submit_job(FinetuneJob("big", _dataset(tok), lora=LoraConfig(r=16)))
    with pytest.raises(ValueError, match="no usable samples"):
        FinetuneJob("empty", Dataset([]))
    with pytest.raises(ValueError, match="no usable samples"):
        from_records([{"text": "x" * 100}], tok, DataConfig(max_seq_len=8, overlong="skip"))
    with pytest.raises(ValueError, match="trains at most 64"):
        engine.submit_job(FinetuneJob("long", _dataset(tok, [{"text": "y" * 100}], 128)))
    with pytest.raises(ValueError, match="job name"):
        FinetuneJob("../escape", _dataset(tok))

    engine.submit_job(FinetuneJob("dup", _dataset(tok), max_steps=1))
    with pytest.raises(ValueError, match="already exists"):
        engine.submit_job(FinetuneJob("dup", _dataset(tok), max_steps=1))
    with pytest.raises(ValueError, match="adapter of a finetuning job"):
        engine.load_adapter(LoraAdapter.zeros_b("dup", LoraConfig(r=4), model.config, 0))

    adapter = LoraAdapter.zeros_b("served", LoraConfig(r=4), model.config, 0)
    engine.load_adapter(adapter)
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter(adapter)
    too_big = LoraAdapter.zeros_b("wide", LoraConfig(r=12), model.config, 0)
    with pytest.raises(ValueError, match="above the slot maximum"):
        engine.load_adapter(too_big)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        engine.add_request(prompt, SamplingParams(max_tokens=2), adapter="nope")
    user = engine.add_request(prompt, SamplingParams(max_tokens=2), adapter="served")
    with pytest.raises(ValueError, match="in use"):
        engine.unload_adapter("served")

    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
    assert done[rid] == greedy_reference(model, prompt, 6)
    assert user in done
    assert engine.job_progress("dup").state == "completed"
    engine.unload_adapter("served")
    assert "served" not in engine.adapters()
    assert engine.kv_usage().used_pages == 0
    assert np.isfinite(engine.job_progress("dup").loss)


def test_a_failing_job_fails_alone_and_slots_are_freed(tmp_path):
    model = tiny_model()
    tok = model.tokenizer
    engine = Engine(model, CONFIG)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the checkpoint directory should be")
    engine.submit_job(FinetuneJob("ok", _dataset(tok), max_steps=2, sequences_per_step=2,
                                  checkpoint_dir=str(tmp_path / "ok-ckpt")))
    with pytest.raises(OSError):
        engine.submit_job(FinetuneJob("bad", _dataset(tok), max_steps=2,
                                      checkpoint_dir=str(blocked / "ckpt")))
    # Exporting onto an existing file fails (FileExistsError) when the job ends.
    engine.submit_job(FinetuneJob("export", _dataset(tok), max_steps=1, sequences_per_step=2,
                                  export_dir=str(blocked)))
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.checkpoint_job("ok") == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.job_progress("export").state == "failed"
    assert "FileExistsError" in engine.job_progress("export").error
    assert engine.job_progress("ok").state == "completed"
    assert rid not in engine.scheduler.requests
    with pytest.raises(ValueError, match="running"):
        engine.submit_job(FinetuneJob("live", _dataset(tok), max_steps=50))
        engine.remove_job("live")
    engine.cancel_job("live")
    before = len(engine.adapters())
    engine.remove_job("ok")
    engine.remove_job("live")
    assert len(engine.adapters()) == before - 2
    with pytest.raises(KeyError):
        engine.job_progress("ok")
