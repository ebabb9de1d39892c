"""The OpenAI-compatible HTTP API over the mock engine, through the official ``openai``
client on loopback: completions streamed and not (tokens, text, usage, logprobs, n, stop
ids), adapters by ``model``, files and fine-tuning jobs (events, checkpoints, cancel,
pagination, a restart), bad input answered with OpenAI error bodies, tenants that never
see each other's files, jobs or adapters, and HTTPS with client certificates."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import httpx2
import openai
import pytest

from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import save_adapter
from coserve_jax.sampling import SamplingParams
from server.http.generation import TextTracker
from server.mock_engine import ByteTokenizer, MockEngine, mock_model_config

from server_support import make_certificates, mock_server, wait_for

RECORDS = [{"prompt": f"q{i}: ", "completion": f"a{i}"} for i in range(6)] + [
    {"text": "plain text sample"}]
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
TOK = ByteTokenizer()


def client(server, token: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key=token, max_retries=0)


def expected(prompt: str, **params) -> list[int]:
    return MockEngine.expected_output(TOK.encode(prompt), SamplingParams(**params))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    with mock_server(tmp, engine=dict(step_delay=0.002), http_port=0,
                     http_max_body_bytes=64 << 10, http_max_upload_bytes=256 << 10) as s:
        yield s


def test_completions_streamed_and_not(server):
    c = client(server)
    want = expected("hello", max_tokens=7, seed=3)
    r = c.completions.create(model="mock", prompt="hello", max_tokens=7, temperature=0,
                             seed=3)
    assert r.object == "text_completion" and r.model == "mock"
    assert r.choices[0].text == TOK.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 7, 12)
    chunks = list(c.completions.create(model="mock", prompt="hello", max_tokens=7, seed=3,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    # A token-id prompt, two choices (seeds 5 and 6), a stop token id (our extension).
    stop = expected("hi", max_tokens=9, seed=6)[4]
    r = c.completions.create(model="mock", prompt=TOK.encode("hi"), max_tokens=9, seed=5,
                             n=2, extra_body={"stop_token_ids": [stop]})
    for choice, seed in zip(r.choices, (5, 6), strict=True):
        got = expected("hi", max_tokens=9, seed=seed, stop_token_ids=(stop,))
        assert choice.text == TOK.decode(got, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if got[-1] == stop else "length")
    assert r.usage.completion_tokens == sum(
        len(expected("hi", max_tokens=9, seed=s, stop_token_ids=(stop,))) for s in (5, 6))


def test_stop_strings_end_the_choice_before_them(server):
    c = client(server)
    full = TOK.decode(expected("stop me", max_tokens=20, seed=3), skip_special_tokens=True)
    cut = full.index("Pa")  # (seed 3 makes "...Par..." at 12)
    r = c.completions.create(model="mock", prompt="stop me", max_tokens=20, seed=3,
                             stop=["zz", "Pa"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20
    chunks = list(c.completions.create(model="mock", prompt="stop me", max_tokens=20,
                                       seed=3, stop="Pa", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_come_with_each_token(server):
    r = client(server).completions.create(model="mock", prompt="abc", max_tokens=4, seed=1,
                                          logprobs=3)
    lp = r.choices[0].logprobs
    tokens = expected("abc", max_tokens=4, seed=1)
    for i, token in enumerate(tokens):
        best, top = MockEngine.logprobs_at(token, i, 3)
        assert lp.token_logprobs[i] == pytest.approx(best)
        assert next(iter(lp.top_logprobs[i].values())) == pytest.approx(best)
        assert lp.top_logprobs[i] == {text: v for text, v in reversed(
            [(TOK.decode([t]), v) for t, v in top])}  # the likeliest of the same text
    assert lp.tokens == [TOK.decode([t]) for t in tokens]


def test_stop_strings_end_the_text_without_splitting_it():
    tracker = TextTracker(TOK, ("STOP",))
    seen, stopped = "", False
    tokens: list[int] = []
    for piece in ["he", "llo S", "TO", "P and more"]:
        tokens += TOK.encode(piece)
        delta, stopped = tracker.feed(tokens, final=False)
        seen += delta
        assert "S" not in delta or stopped is False  # "S" could start "STOP": held back
        if stopped:
            break
    assert stopped and seen == "hello "
    # A partial UTF-8 character waits for its other bytes.
    tracker = TextTracker(TOK, ())
    euro = TOK.encode("€")
    assert tracker.feed(euro[:1], final=False) == ("", False)
    assert tracker.feed(euro, final=False) == ("€", False)


def test_models_and_adapters_by_model(server, tmp_path):
    c = client(server)
    adapter_root = server.config.adapter_root
    adapter = LoraAdapter.zeros_b("x", LoraConfig(r=4), mock_model_config(), seed=0)
    save_adapter(adapter, f"{adapter_root}/mine")
    resp = c.post("/load_lora_adapter", body={"lora_name": "mine", "lora_path": "mine"},
                  cast_to=httpx2.Response)
    assert resp.status_code == 200 and "Success" in resp.text
    models = {m.id: m for m in c.models.list()}
    assert models["mine"].parent == "mock" and models["mock"].parent is None
    r = c.completions.create(model="mine", prompt="hello", max_tokens=3, seed=3)
    assert r.choices[0].text == TOK.decode(expected("hello", max_tokens=3, seed=3),
                                           skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nobody", prompt="hello", max_tokens=3)
    assert e.value.body["param"] == "model" and "nobody" in e.value.body["message"]
    resp = c.post("/unload_lora_adapter", body={"lora_name": "mine"}, cast_to=httpx2.Response)
    assert resp.status_code == 200
    assert "mine" not in {m.id for m in c.models.list()}


def test_files_jobs_events_cancel_and_pages(server):
    c = client(server)
    f = c.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(JSONL)
    assert f.id in {x.id for x in c.files.list()}
    assert c.files.retrieve(f.id).filename == "train.jsonl"
    short = c.fine_tuning.jobs.create(training_file=f.id, model="mock", suffix="short",
                                      hyperparameters={"n_epochs": 3, "batch_size": 2})
    assert short.fine_tuned_model.startswith("ft-short-")
    assert short.status in ("running", "succeeded")  # 11 mock steps may already be done
    long = c.fine_tuning.jobs.create(training_file=f.id, model="mock",
                                     extra_body={"max_steps": 10**6, "checkpoint_every": 5})
    # The adapter serves at once, while the job trains.
    r = c.completions.create(model=long.fine_tuned_model, prompt="q1: ", max_tokens=2)
    assert r.usage.completion_tokens == 2
    done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(short.id)).status ==
                    "succeeded" and j, what="the short job")
    assert done.trained_tokens > 0 and done.finished_at is not None
    events = list(c.fine_tuning.jobs.list_events(short.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 11 and metrics[0].data["step"] == 11  # ceil(7 * 3 / 2), newest first
    assert events[0].message == "The job has successfully completed"
    page = c.fine_tuning.jobs.list_events(short.id, limit=4)
    assert len(page.data) == 4 and page.has_more
    later = c.fine_tuning.jobs.list_events(short.id, limit=100, after=page.data[-1].id)
    assert [e.id for e in page.data] + [e.id for e in later.data] == [e.id for e in events]
    wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(long.id).data, what="a checkpoint")
    cancelled = c.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert c.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    third = c.fine_tuning.jobs.create(training_file=f.id, model="mock",
                                      extra_body={"max_steps": 2})
    first = c.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == [third.id, long.id] and first.has_more
    rest = c.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert short.id in [j.id for j in rest.data]
    wait_for(lambda: c.fine_tuning.jobs.retrieve(third.id).status == "succeeded")
    assert c.files.delete(f.id).deleted and f.id not in {x.id for x in c.files.list()}


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server):
    url = server.http_url

    def post(path, content, **headers):
        r = httpx2.post(url + path, content=content, timeout=30,
                        headers={"Content-Type": "application/json", **headers})
        return r.status_code, r.json()["error"]

    status, error = post("/completions", b'{"model": "mock", "prompt": ')
    assert status == 400 and error["code"] == "invalid_json" and "JSON" in error["message"]
    for body, param in [({"model": "mock", "prompt": "x", "temperature": "hot"}, "temperature"),
                        ({"model": "mock", "prompt": "x", "max_tokens": -3}, "max_tokens"),
                        ({"model": "mock", "prompt": 17}, "prompt"),
                        ({"prompt": "x"}, "model")]:
        status, error = post("/completions", json.dumps(body).encode())
        assert status == 422 and error["param"].startswith(param), (body, error)
        assert error["type"] == "invalid_request_error" and param in error["message"]
    status, error = post("/completions", json.dumps(
        {"model": "ghost", "prompt": "x"}).encode())
    assert status == 404 and error["param"] == "model" and "ghost" in error["message"]
    status, error = post("/completions", json.dumps(
        {"model": "mock", "prompt": "x", "max_tokens": 10**6}).encode())
    assert status == 400 and "max_tokens" in error["message"]
    status, error = post("/completions", json.dumps(
        {"model": "mock", "prompt": "x" * (80 << 10)}).encode())
    assert status == 413 and error["code"] == "request_too_large"
    status, error = post("/completions", (b"x" * 1024 for _ in range(80)))  # chunked
    assert status == 413 and error["code"] == "request_too_large"
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("bad.jsonl", JSONL + b'{"text": 1}\n' + JSONL),
                       purpose="fine-tune")
    assert "line 8" in e.value.body["message"] and "bad.jsonl" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("worse.jsonl", b'{"prompt": "a"}\n'), purpose="fine-tune")
    assert "line 1" in e.value.body["message"] and "completion" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big.jsonl", JSONL * 4000), purpose="fine-tune")
    assert e.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")
    # Still serving.
    r = c.completions.create(model="mock", prompt="hello", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_tenants_are_isolated(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("tok-a alice\ntok-b bob\n")
    with mock_server(tmp_path, http_port=0, tokens_file=str(tokens)) as s:
        alice, bob = client(s, "tok-a"), client(s, "tok-b")
        with pytest.raises(openai.AuthenticationError) as e:
            client(s, "tok-x").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        f = alice.files.create(file=("a.jsonl", JSONL), purpose="fine-tune")
        job = alice.fine_tuning.jobs.create(training_file=f.id, model="mock",
                                            extra_body={"max_steps": 10**6})
        assert alice.completions.create(model=job.fine_tuned_model, prompt="x",
                                        max_tokens=1).usage.completion_tokens == 1
        assert bob.files.list().data == [] and bob.fine_tuning.jobs.list().data == []
        assert [m.id for m in bob.models.list()] == ["mock"]
        for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.delete(f.id),
                     lambda: bob.fine_tuning.jobs.retrieve(job.id),
                     lambda: bob.fine_tuning.jobs.cancel(job.id),
                     lambda: bob.fine_tuning.jobs.list_events(job.id),
                     lambda: bob.fine_tuning.jobs.create(training_file=f.id, model="mock"),
                     lambda: bob.completions.create(model=job.fine_tuned_model, prompt="x",
                                                    max_tokens=1)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert alice.fine_tuning.jobs.retrieve(job.id).status == "running"
        assert alice.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_files_and_jobs_survive_a_restart(tmp_path):
    with mock_server(tmp_path, http_port=0, engine=dict(step_delay=0.01)) as s:
        c = client(s)
        f = c.files.create(file=("t.jsonl", JSONL), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="mock",
                                        extra_body={"max_steps": 400, "checkpoint_every": 2})
        wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).step >= 4, what="steps")
    with mock_server(tmp_path, http_port=0) as s:
        c = client(s)
        assert c.files.retrieve(f.id).filename == "t.jsonl"
        again = c.fine_tuning.jobs.retrieve(job.id)
        assert again.fine_tuned_model == job.fine_tuned_model and again.step >= 4
        done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status ==
                        "succeeded" and j, what="the resumed job")
        assert done.step == 400
        events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert events[0].message == "The job has successfully completed"
        assert [e.data["step"] for e in events[1:]] == list(range(400, 301, -1))
        t0 = time.monotonic()
        assert c.completions.create(model=job.fine_tuned_model, prompt="x",
                                    max_tokens=1).usage.completion_tokens == 1
        assert time.monotonic() - t0 < 10


def test_https_and_mutual_tls_as_over_grpc(tmp_path):
    certs = make_certificates(tmp_path)

    def models(server, client_cert: bool) -> list[str]:
        context = ssl.create_default_context(cafile=certs["ca.pem"])
        if client_cert:
            context.load_cert_chain(certs["client.pem"], certs["client.key"])
        with urllib.request.urlopen(server.http_url + "/models", context=context,
                                    timeout=10) as r:
            return [m["id"] for m in json.load(r)["data"]]

    with mock_server(tmp_path, tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                     tls_client_ca=certs["ca.pem"], host="localhost", http_port=0) as server:
        assert server.http_url.startswith("https://")
        assert models(server, client_cert=True) == ["mock"]
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            models(server, client_cert=False)  # the door asks for a certificate
