"""The server over the real engine on the embedded model, through a real client over
loopback: streams equal ``coserve_jax.generate``; 64 concurrent streams beside a
finetuning job all complete, and the 65th is refused at once; cancel and deadline
free the request's KV pages."""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest

import coserve_jax
from coserve_jax import Engine, EngineConfig
from coserve_jax.finetune.data import synthetic_task
from server.app import ServerThread
from server.client import Client, collect, finetune_request, generate_request
from server.demo import DEMO_ENGINE
from server.engine_api import Backend
from server.proto import coserve_pb2 as pb
from server.service import Limits

from server_support import config, scrape, wait_for
from support import tiny_model

# The demo's engine: tests and `make demo` share its compiled programs (XLA cache). The
# server's own caps are under test here, so the engine's admission control stays off.
CONFIG = EngineConfig.flat(**DEMO_ENGINE, admission_control=False)
STREAMS = 64


def backend() -> Backend:
    model = tiny_model()
    engine = Engine(model, CONFIG)  # buckets compile on first use, from the XLA cache
    return Backend(engine=engine, tokenizer=model.tokenizer, model_config=model.config,
                   max_lora_rank=CONFIG.adapters.max_lora_rank,
                   max_train_len=engine.trainer.config.max_len, model_name=model.path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("engine"),
                 limits=Limits(max_streams=STREAMS, max_queue=STREAMS))
    with ServerThread(backend(), cfg) as server, Client(server.address) as client:
        yield server, client, tiny_model()


def test_stream_equals_local_generate(served):
    _, client, model = served
    tok = model.tokenizer
    for prompt, sampling in [("The quick brown fox", {}),
                             ("Co-serving means", dict(temperature=0.8, top_p=0.9, seed=7)),
                             ("Hello", dict(temperature=1.0, top_k=20, seed=3))]:
        c = client.generate(prompt, max_tokens=20, ignore_eos=True, **sampling)
        want = coserve_jax.generate(model, [tok.encode(prompt)], 20, engine_config=CONFIG,
                                    ignore_eos=True, **sampling)[0]
        assert c.token_ids == want
        assert c.text == tok.decode(want, skip_special_tokens=True)
        assert c.result.completion_tokens == 20 and c.result.prompt_tokens == len(
            tok.encode(prompt))


def test_64_streams_beside_a_job_and_the_cap(served):
    server, client, model = served
    job = client.submit_finetune(finetune_request(
        "busy", records=synthetic_task("reverse", 64, seed=1), r=8, sequences_per_step=2,
        max_steps=10**5, max_seq_len=64))
    assert job.state == pb.JOB_STATE_RUNNING
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in rng.integers(3, 30, STREAMS)]
    calls = [client.stream(generate_request(p, max_tokens=16, ignore_eos=True), timeout=600)
             for p in prompts]
    results: dict[int, object] = {}
    admitted = threading.Barrier(STREAMS + 1)

    def consume(i):
        first = next(calls[i])
        assert first.request_id and not first.token_ids
        admitted.wait()
        rest = collect(calls[i])
        results[i] = ([*first.token_ids, *rest.token_ids], rest)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    admitted.wait(timeout=120)  # all 64 are open
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        client.generate([5, 6], max_tokens=4)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 2.0
    for t in threads:
        t.join(600)
    assert sorted(results) == list(range(STREAMS))
    # Nothing lost, nothing mixed up: each stream is what an engine alone gives its prompt.
    want = coserve_jax.generate(model, prompts, 16, engine_config=CONFIG, ignore_eos=True)
    for i, (ids, last) in results.items():
        assert ids == want[i], i
        assert last.result.completion_tokens == 16 and last.result.finish_reason == "length"
    trained = client.get_job("busy")
    assert trained.step > 0 and trained.tokens_trained > 0
    assert client.cancel_job("busy").state == pb.JOB_STATE_CANCELLED
    m = scrape(server.metrics_url)
    assert m['coserve_requests_total{outcome="ok"}'] >= STREAMS
    assert m['coserve_requests_total{outcome="resource_exhausted"}'] >= 1
    assert m["coserve_ttft_seconds_count"] >= STREAMS


def test_cancel_and_deadline_free_pages(served):
    server, client, _ = served
    idle = wait_for(lambda: (m := scrape(server.metrics_url))["coserve_kv_pages_used"] == 0
                    and m, what="an idle cache")
    assert idle["coserve_kv_pages_total"] == CONFIG.cache.num_pages
    prompt = list(range(10, 40))
    call = client.stream(generate_request(prompt, max_tokens=200, ignore_eos=True))
    next(call)
    assert next(call).token_ids
    assert scrape(server.metrics_url)["coserve_kv_pages_used"] >= 2
    call.cancel()
    wait_for(lambda: scrape(server.metrics_url)["coserve_kv_pages_used"] == 0, 10,
             what="pages freed after a cancel")
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, max_tokens=220, ignore_eos=True, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's timer fires first; the server may not have admitted the request (and so
    # holds no pages for it) until its own deadline ends the stream, so wait for both.
    m = wait_for(lambda: (m := scrape(server.metrics_url))["coserve_open_streams"] == 0
                 and m["coserve_kv_pages_used"] == 0 and m,
                 10, what="the stream closed and its pages freed after a deadline")
    assert m['coserve_requests_total{outcome="cancelled"}'] >= 1
    # And the server serves on.
    assert client.generate(prompt, max_tokens=3).result.completion_tokens == 3


def test_drain_checkpoints_a_running_job_which_then_resumes(tmp_path):
    """The engine saves only every checkpoint_every steps; a drain saves the step it is at."""
    cfg = config(tmp_path)
    request = finetune_request("drained", records=synthetic_task("copy", 32, seed=2), r=4,
                               sequences_per_step=2, max_steps=30, checkpoint_every=1000,
                               max_seq_len=64)
    with ServerThread(backend(), cfg) as server, Client(server.address) as client:
        client.submit_finetune(request)
        wait_for(lambda: client.get_job("drained").step >= 3, 300, what="training")
    steps = [int(d) for d in os.listdir(os.path.join(
        cfg.state_dir, "jobs", os.listdir(os.path.join(cfg.state_dir, "jobs"))[0],
        "checkpoint")) if d.isdigit()]
    assert steps and 3 <= max(steps) < 30
    with ServerThread(backend(), cfg) as server, Client(server.address) as client:
        job = client.get_job("drained")
        assert job.resumed_from_step == max(steps)
        final = list(client.watch_job("drained", interval_s=0.2))[-1]
        assert final.state == pb.JOB_STATE_COMPLETED and final.step == 30
