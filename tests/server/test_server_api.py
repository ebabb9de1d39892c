"""The gRPC API over loopback, on the deterministic mock engine: streams, errors, caps,
cancellation, jobs, adapters, health and reflection."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import save_adapter
from coserve_jax.sampling import SamplingParams
from server.client import Client, collect, finetune_request, generate_request
from server.mock_engine import ByteTokenizer, MockEngine, mock_model_config
from server.proto import coserve_pb2 as pb
from server.service import Limits

from server_support import mock_server, scrape, wait_for

RECORDS = [{"prompt": f"q{i}: ", "completion": f"a{i}"} for i in range(16)]


@pytest.fixture
def server(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.002)) as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.address) as c:
        yield c


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_generate_streams_the_engine_output(server, client):
    prompt = [1, 40, 50, 60]
    params = SamplingParams(max_tokens=12, seed=5)
    c = client.generate(prompt, max_tokens=12, seed=5, ttft_s=5.0, tpot_s=5.0)
    assert c.token_ids == MockEngine.expected_output(prompt, params)
    assert c.text == ByteTokenizer().decode(c.token_ids, skip_special_tokens=True)
    assert c.request_id.startswith("req-") and c.num_messages >= 2
    r = c.result
    assert r.finish_reason == "length" and r.prompt_tokens == 4 and r.completion_tokens == 12
    assert 0 <= r.ttft_s <= r.e2e_s and r.tpot_s >= 0 and r.slo_attained
    slo, arrival = server.backend.engine.last_slo  # targets reach the engine's scheduler
    assert (slo.ttft_s, slo.tpot_s) == (5.0, 5.0) and arrival <= time.monotonic()
    # Text prompts use the tokenizer; add_bos puts BOS first; stop tokens end early.
    ids = [1, *ByteTokenizer().encode("hi")]
    stop = MockEngine.expected_output(ids, SamplingParams(max_tokens=9, seed=1))[3]
    c = client.generate("hi", add_bos=True, max_tokens=9, seed=1, stop_token_ids=[stop],
                        request_id="mine")
    assert c.request_id == "mine" and c.result.finish_reason == "stop"
    assert c.token_ids == MockEngine.expected_output(
        ids, SamplingParams(max_tokens=9, seed=1, stop_token_ids=(stop,)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(max_tokens=0), "sampling.max_tokens"),
    (dict(seed=-3), "sampling.seed"),
    (dict(stop_token_ids=[-1]), "sampling.stop_token_ids"),
    (dict(max_tokens=10_000), "max_tokens"),
    (dict(ttft_s=-1.0), "slo.ttft_s"),
    (dict(adapter="no/slashes"), "adapter"),
])
def test_invalid_arguments_name_the_field(client, kwargs, field):
    code, details = code_of(lambda: client.generate([5, 6], **kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details


def test_invalid_prompts(client):
    for request, words in [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(prompt="x", prompt_token_ids=[5]), "prompt"),
        (pb.GenerateRequest(prompt_token_ids=[5, 100_000]), "prompt token id 100000"),
    ]:
        code, details = code_of(lambda r=request: collect(client.stream(r)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details


def test_unknown_names_are_not_found(client):
    for fn in (lambda: client.generate([5], adapter="nope"), lambda: client.get_job("nope"),
               lambda: client.cancel_job("nope"), lambda: list(client.watch_job("nope")),
               lambda: client.unload_adapter("nope"),
               lambda: client.export_adapter("nope", "out")):
        assert code_of(fn)[0] == grpc.StatusCode.NOT_FOUND


def test_stream_cap_answers_resource_exhausted_at_once(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.02),
                     limits=Limits(max_streams=3, max_queue=3)) as server, \
            Client(server.address) as client:
        calls = [client.stream(generate_request([5, i + 3], max_tokens=200)) for i in range(3)]
        for call in calls:
            assert next(call).request_id  # admitted
        t0 = time.monotonic()
        code, details = code_of(lambda: client.generate([7], max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap" in details
        assert time.monotonic() - t0 < 1.0
        for call in calls:
            call.cancel()
        # Capacity comes back once the cancelled streams are gone.
        wait_for(lambda: scrape(server.metrics_url)["coserve_open_streams"] == 0)
        assert client.generate([7], max_tokens=2).result.completion_tokens == 2


def test_queue_cap(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.02, max_num_seqs=1),
                     limits=Limits(max_streams=10, max_queue=2)) as server, \
            Client(server.address) as client:
        running = client.stream(generate_request([5], max_tokens=200))
        assert len(next(running).request_id) and next(running).token_ids  # it has a token
        waiting = [client.stream(generate_request([6 + i], max_tokens=5)) for i in range(2)]
        for call in waiting:
            next(call)
        code, details = code_of(lambda: client.generate([7], max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details
        running.cancel()
        for call in waiting:
            assert collect(call).result.completion_tokens == 5


def test_cancel_and_deadline_free_pages(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.01)) as server, \
            Client(server.address) as client:
        _cancel_and_deadline(server.metrics_url, client)


def _cancel_and_deadline(metrics: str, client: Client) -> None:
    assert scrape(metrics)["coserve_kv_pages_used"] == 0
    call = client.stream(generate_request([5] * 40, max_tokens=200))
    next(call)
    assert next(call).token_ids
    assert scrape(metrics)["coserve_kv_pages_used"] > 0
    call.cancel()
    wait_for(lambda: scrape(metrics)["coserve_kv_pages_used"] == 0, 5, what="pages freed")
    code, _ = code_of(lambda: client.generate([5] * 40, max_tokens=200, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's timer fires first; the server counts the stream once its own deadline
    # ends it, and gives its pages back after that.
    m = wait_for(lambda: (m := scrape(metrics)).get(
        'coserve_requests_total{outcome="deadline_exceeded"}') == 1
        and m["coserve_kv_pages_used"] == 0 and m, 5, what="the stream counted, pages freed")
    assert m['coserve_requests_total{outcome="cancelled"}'] == 1
    assert m['coserve_requests_total{outcome="deadline_exceeded"}'] == 1
    assert m["coserve_open_streams"] == 0 and m["coserve_running_requests"] == 0
    assert m["coserve_queue_length"] == 0


def test_concurrent_streams_all_complete(client):
    results = {}

    def one(i):
        results[i] = client.generate([3 + i, 9], max_tokens=10 + i % 5, seed=i)

    def bad(i):  # errors in other requests meanwhile change nothing for these
        with pytest.raises(grpc.RpcError):
            client.generate([3, 10**6] if i % 2 else [], max_tokens=5)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    threads += [threading.Thread(target=bad, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, c in results.items():
        assert c.token_ids == MockEngine.expected_output(
            [3 + i, 9], SamplingParams(max_tokens=10 + i % 5, seed=i))
    assert len(results) == 24


def test_jobs(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.005),
                     limits=Limits(max_jobs=2)) as server, Client(server.address) as client:
        job = client.submit_finetune(finetune_request("quick", records=RECORDS, max_steps=30,
                                                      sequences_per_step=2))
        assert job.name == "quick" and job.total_steps == 30 and job.num_samples == 16
        seen = list(client.watch_job("quick", interval_s=0.05))
        assert seen[-1].state == pb.JOB_STATE_COMPLETED and seen[-1].step == 30
        assert [j.step for j in seen] == sorted(j.step for j in seen)
        assert seen[-1].loss < seen[-1].first_loss
        code, _ = code_of(lambda: client.submit_finetune(
            finetune_request("quick", records=RECORDS, max_steps=3)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        # Two long jobs reach the cap; a third is refused at once; cancelling frees a place.
        for name in ("long1", "long2"):
            client.submit_finetune(finetune_request(name, records=RECORDS, max_steps=10**6))
        code, _ = code_of(lambda: client.submit_finetune(
            finetune_request("long3", records=RECORDS, max_steps=5)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.cancel_job("long1").state == pb.JOB_STATE_CANCELLED
        assert client.get_job("long2").state == pb.JOB_STATE_RUNNING
        assert {j.name for j in client.list_jobs()} == {"quick", "long1", "long2"}
        m = wait_for(lambda: (m := scrape(server.metrics_url)) and m.get(
            'coserve_finetune_step{job="long2",tenant="default"}', 0) > 0 and m)
        assert m['coserve_finetune_loss{job="long2",tenant="default"}'] > 0
        client.cancel_job("long2")


def test_job_datasets_and_paths(tmp_path):
    with mock_server(tmp_path) as server, Client(server.address) as client:
        data = tmp_path / "data"
        (data / "train.jsonl").write_text('{"text": "hello there"}\n{"text": "again"}\n')
        (data / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
        outside = tmp_path / "outside.jsonl"
        outside.write_text('{"text": "secret"}\n')
        os.symlink(outside, data / "link.jsonl")
        job = client.submit_finetune(finetune_request("fromfile", dataset_path="train.jsonl",
                                                      max_steps=2))
        assert job.num_samples == 2
        cases = [("bad.jsonl", grpc.StatusCode.INVALID_ARGUMENT, "bad.jsonl, line 2"),
                 ("../outside.jsonl", grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
                 (str(outside), grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
                 ("link.jsonl", grpc.StatusCode.INVALID_ARGUMENT, "outside"),
                 ("missing.jsonl", grpc.StatusCode.NOT_FOUND, "missing.jsonl")]
        for i, (path, want, words) in enumerate(cases):
            code, details = code_of(lambda p=path, i=i: client.submit_finetune(
                finetune_request(f"j{i}", dataset_path=p, max_steps=2)))
            assert code == want and words in details, (path, details)
            assert str(tmp_path) not in details  # server paths never leak
        bad = finetune_request("inline", records=[{"prompt": "a", "completion": "b"}],
                               max_steps=2)
        bad.samples.samples.add()  # a sample with nothing set
        code, details = code_of(lambda: client.submit_finetune(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "samples[1]" in details
        for kwargs, field in [(dict(r=0, lora_alpha=-1.0), "lora_alpha"),
                              (dict(learning_rate=-1.0), "learning_rate"),
                              (dict(max_seq_len=10**6), "max_seq_len"),
                              (dict(seed=-1), "seed"), (dict(r=64), "lora.r")]:
            code, details = code_of(lambda k=kwargs: client.submit_finetune(
                finetune_request("x", records=RECORDS, max_steps=2, **k)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details


def _peft_dir(root, name: str, r: int = 4) -> str:
    adapter = LoraAdapter.zeros_b(name, LoraConfig(r=r, lora_alpha=8), mock_model_config(), 0)
    path = os.path.join(root, name)
    save_adapter(adapter, path)
    return path


def test_adapters(server, client, tmp_path):
    root = tmp_path / "adapters"
    _peft_dir(root, "style")
    a = client.load_adapter("style")
    assert a.name == "style" and a.kind == pb.ADAPTER_KIND_LOADED and a.r == 4
    assert client.load_adapter("style", name="style2").name == "style2"
    code, _ = code_of(lambda: client.load_adapter("style"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert client.load_adapter("style", replace=True).name == "style"
    assert [x.name for x in client.list_adapters()] == ["style", "style2"]
    assert client.generate([5, 6], adapter="style", max_tokens=3).result.completion_tokens == 3
    assert client.export_adapter("style", "copies/style") == "copies/style"
    assert os.path.isfile(root / "copies" / "style" / "adapter_model.safetensors")
    code, _ = code_of(lambda: client.export_adapter("style", "copies/style"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    client.export_adapter("style", "copies/style", overwrite=True)
    client.unload_adapter("style2")
    assert [x.name for x in client.list_adapters()] == ["style"]
    # Paths stay inside the adapter root, symlinks included.
    outside = tmp_path / "elsewhere"
    _peft_dir(outside, "evil")
    os.symlink(outside / "evil", root / "evil")
    os.makedirs(root / "sneaky")
    os.symlink(outside / "evil" / "adapter_config.json", root / "sneaky" / "adapter_config.json")
    for path in ("evil", "../elsewhere/evil", str(outside / "evil"), "sneaky", ".", ""):
        code, details = code_of(lambda p=path: client.load_adapter(p, name="x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "path" in details, (path, details)
    code, _ = code_of(lambda: client.export_adapter("style", "../out"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(lambda: client.load_adapter("missing"))
    assert code == grpc.StatusCode.NOT_FOUND
    _peft_dir(root, "broken")
    (root / "broken" / "adapter_config.json").write_text('{"r": "many"}')
    code, details = code_of(lambda: client.load_adapter("broken"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(tmp_path) not in details
    # A job's adapter: served under its name, exported from its latest weights.
    client.submit_finetune(finetune_request("tuned", records=RECORDS, max_steps=5))
    wait_for(lambda: client.get_job("tuned").state == pb.JOB_STATE_COMPLETED)
    kinds = {x.name: x.kind for x in client.list_adapters()}
    assert kinds["tuned"] == pb.ADAPTER_KIND_FINETUNE
    code, _ = code_of(lambda: client.unload_adapter("tuned"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    client.export_adapter("tuned", "tuned-out")
    assert os.path.isfile(root / "tuned-out" / "adapter_config.json")


def test_health_and_reflection(server, client):
    assert client.health() == "SERVING"
    assert client.health("coserve.v1.Coserve") == "SERVING"
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"coserve.v1.Coserve", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("coserve.v1.Coserve").name.endswith("coserve.proto")
