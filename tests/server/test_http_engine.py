"""The HTTP API over the real engine on the embedded model, through the official
``openai`` client: greedy completions and chat (streamed and not) are the tokens the
engine's own ``generate`` gives, logprobs are those of the model's distribution, and a
file becomes a job whose adapter serves completions while it trains and after."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import jax
import numpy as np
import openai
import pytest
from test_server_engine import CONFIG, backend

import coserve_jax
from coserve_jax.finetune.data import synthetic_task
from server.app import ServerThread

from server_support import config, wait_for
from support import tiny_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with ServerThread(backend(), config(tmp_path_factory.mktemp("http-engine"),
                                        http_port=0)) as server:
        client = openai.OpenAI(base_url=server.http_url, api_key="x", max_retries=0)
        yield server, client, tiny_model(), server.server.http.ctx.model_id


def test_greedy_completions_and_chat_equal_generate(served):
    _, client, model, base = served
    tok = model.tokenizer
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    want = coserve_jax.generate(model, [ids], 12, engine_config=CONFIG, ignore_eos=True)[0]
    text = tok.decode(want, skip_special_tokens=True)
    r = client.completions.create(model=base, prompt=prompt, max_tokens=12, temperature=0,
                                  logprobs=5, extra_body={"ignore_eos": True})
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    # Logprobs of the model's distribution at each step: one forward over the sequence.
    logits = np.asarray(coserve_jax.forward_logits(model, [ids + want])[0], np.float32)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    got = r.choices[0].logprobs
    for i, token in enumerate(want):
        row = ref[len(ids) - 1 + i]
        assert got.token_logprobs[i] == pytest.approx(row[token], abs=1e-4)
        top5 = np.sort(row)[::-1][:5]
        assert max(got.top_logprobs[i].values()) == pytest.approx(top5[0], abs=1e-4)
        assert got.token_logprobs[i] == max(got.top_logprobs[i].values())  # greedy: top-1
    chunks = list(client.completions.create(model=base, prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == text

    messages = [{"role": "user", "content": "uppercase: hello"}]
    chat_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
    want = coserve_jax.generate(model, [chat_ids], 10, engine_config=CONFIG,
                                ignore_eos=True)[0]
    r = client.chat.completions.create(model=base, messages=messages, temperature=0,
                                       max_completion_tokens=10, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(chat_ids) and r.usage.completion_tokens == 10
    assert len(r.choices[0].logprobs.content) == 10
    assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(
        model=base, messages=messages, temperature=0, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_a_file_becomes_a_job_whose_adapter_serves_while_it_trains(served):
    server, client, model, base = served
    records = synthetic_task("uppercase", 32, seed=0, min_len=3, max_len=5)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    f = client.files.create(file=("upper.jsonl", data), purpose="fine-tune")
    common = dict(training_file=f.id, model=base, seed=1,
                  hyperparameters={"batch_size": 2, "learning_rate_multiplier": 5.0})
    extra = {"lora": {"r": 8}, "max_seq_len": 64}
    # A job that trains as long as the test needs: its adapter serves at once, beside it.
    busy = client.fine_tuning.jobs.create(**common, suffix="busy",
                                          extra_body={**extra, "max_steps": 10**5})
    assert busy.fine_tuned_model in {m.id for m in client.models.list()}
    prompt = records[0]["prompt"]
    wait_for(lambda: client.fine_tuning.jobs.retrieve(busy.id).step >= 2, timeout=300,
             what="training steps")
    r = client.completions.create(model=busy.fine_tuned_model, prompt=prompt, max_tokens=4,
                                  temperature=0)
    assert r.usage.completion_tokens <= 4 and r.model == busy.fine_tuned_model
    events = client.fine_tuning.jobs.list_events(busy.id, limit=100).data
    assert [e.data["step"] for e in events if e.type == "metrics"][-1] == 1  # oldest last
    assert client.fine_tuning.jobs.retrieve(busy.id).status == "running"
    assert client.fine_tuning.jobs.cancel(busy.id).status == "cancelled"

    # A job that completes, its events followed as it goes.
    job = client.fine_tuning.jobs.create(**common, suffix="upper",
                                         extra_body={**extra, "max_steps": 4})
    steps_seen = set()

    def collect():
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100):
            if e.type == "metrics":
                steps_seen.add(e.data["step"])
                assert np.isfinite(e.data["train_loss"])

    def finished():
        collect()
        return client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"

    wait_for(finished, timeout=300, interval=0.2, what="the job")
    collect()  # (the last step may end between a listing and the status that follows it)
    assert steps_seen == set(range(1, 5))
    # After training the adapter gives what the engine alone gives with the job's weights.
    adapter = job.fine_tuned_model
    internal = server.server.service.job_record("default", adapter).internal
    trained = asyncio.run_coroutine_threadsafe(
        server.server.bridge.call(lambda e: e.trained_adapter(internal)),
        server._loop).result(60)
    ids = model.tokenizer.encode(prompt)
    want = coserve_jax.generate(model, [ids], 6, engine_config=CONFIG, ignore_eos=True,
                                adapter=dataclasses.replace(trained, name="check"))[0]
    r = client.completions.create(model=adapter, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == model.tokenizer.decode(want, skip_special_tokens=True)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 4
