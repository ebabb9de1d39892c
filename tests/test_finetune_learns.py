"""A finetuning job learns a synthetic task while inference requests share its steps."""

from __future__ import annotations

import numpy as np
from suite_flags import OPTIMIZED

from coserve_jax import (
    Engine,
    EngineConfig,
    FinetuneJob,
    LoraConfig,
    OptimizerConfig,
    SamplingParams,
)
from coserve_jax.finetune.data import DataConfig, from_records, synthetic_task
from coserve_jax.lora.config import ALL_TARGETS

from support import tiny_model

# 600 training steps: this test's time is in running, so its programs are optimized.
CONFIG = EngineConfig.flat(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256,
                           max_train_seqs=8, train_window=32, backward_layers=4,
                           backward_pieces_per_step=4, xla_options=OPTIMIZED)


def _accuracy(engine, tok, records, adapter):
    prompts = [[tok.bos_token_id, *tok.encode(r["prompt"])] for r in records]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8), adapter=adapter)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    want = [r["completion"] for r in records]
    exact = np.mean([t == w for t, w in zip(texts, want, strict=True)])
    pairs = zip(texts, want, strict=True)
    chars = sum(sum(a == b for a, b in zip(t, w, strict=False)) for t, w in pairs)
    return exact, chars / sum(len(w) for w in want)


def test_learns_uppercase_while_serving():
    model = tiny_model()
    tok = model.tokenizer
    data = from_records(synthetic_task("uppercase", 1024, seed=0, min_len=3, max_len=5), tok,
                        DataConfig(max_seq_len=64))
    held_out = synthetic_task("uppercase", 32, seed=99, min_len=3, max_len=5)
    engine = Engine(model, CONFIG)
    job = FinetuneJob("upper", data, lora=LoraConfig(r=16, lora_alpha=32,
                                                     target_modules=ALL_TARGETS),
                      optimizer=OptimizerConfig(learning_rate=1e-3), sequences_per_step=4,
                      max_steps=600, seed=0)
    engine.submit_job(job)
    before = _accuracy(engine, tok, held_out, "upper")

    # Base-model requests arrive while the job trains and share its steps.
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in rng.integers(4, 40, 24)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    served: dict[str, list[int]] = {}
    ids = []
    while engine.job_progress("upper").state == "running":
        if len(ids) < len(prompts) and engine.num_steps % 20 == 0:
            ids.append(engine.add_request(prompts[len(ids)], params))
        for out in engine.step():
            if out.finished:
                served[out.request_id] = out.output_token_ids
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                served[out.request_id] = out.output_token_ids

    progress = engine.job_progress("upper")
    assert progress.state == "completed" and progress.step == 600
    start, end = progress.losses[0], np.mean(progress.losses[-20:])
    assert end < start / 5, (start, end)
    exact, chars = _accuracy(engine, tok, held_out, "upper")
    assert before[1] < 0.1 and chars > 0.6 and exact > 0.25, (before, exact, chars)
    assert engine.counters["mixed_steps"] >= 20

    # The base-model requests got exactly what an engine that never finetuned gives them.
    plain = Engine(model, CONFIG.replace(max_train_seqs=0))
    assert [served[i] for i in ids] == plain.generate(prompts[:len(ids)], params)
