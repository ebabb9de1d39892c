"""Both front doors under load on one engine: 64 concurrent streaming clients, HTTP and
gRPC mixed, each completes with its whole output or is refused at once (429 /
RESOURCE_EXHAUSTED) by the shared stream cap; HTTP clients that hang up free their KV
pages within an iteration or so; ``coserve serve --http-port`` serves both doors and
drains on SIGTERM; a drain lets HTTP streams finish, a device failure ends them with an
error event."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import socket
import threading
import time

import grpc
import openai

from coserve_jax.sampling import SamplingParams
from server.app import ServerThread
from server.client import Client, collect, generate_request
from server.mock_engine import ByteTokenizer, MockEngine, mock_backend
from server.service import Limits

from server_support import ServerProcess, config, mock_server, scrape, wait_for

CLIENTS = 64
CAP = 40
TOK = ByteTokenizer()


def test_64_mixed_streams_complete_or_are_refused_at_once(tmp_path):
    limits = Limits(max_streams=CAP, max_queue=CLIENTS)
    with mock_server(tmp_path, engine=dict(step_delay=0.002), limits=limits,
                     http_port=0) as server:
        gate = threading.Event()
        # Hold the engine thread: admitted requests wait for it, so exactly CAP are open
        # when the others arrive, and those must be refused without waiting.
        server.server.bridge.post(lambda engine: gate.wait(60))
        http = openai.OpenAI(base_url=server.http_url, api_key="x", max_retries=0)
        grpc_client = Client(server.address)
        results: dict[int, tuple] = {}

        def one(i: int) -> None:
            prompt, t0 = f"prompt {i}", time.monotonic()
            want = MockEngine.expected_output(TOK.encode(prompt),
                                              SamplingParams(max_tokens=24, seed=i))
            try:
                if i % 2:
                    c = collect(grpc_client.stream(generate_request(
                        prompt, max_tokens=24, seed=i, ignore_eos=True), timeout=120))
                    results[i] = ("ok", c.token_ids == want, time.monotonic() - t0)
                else:
                    chunks = list(http.completions.create(
                        model="mock", prompt=prompt, max_tokens=24, seed=i, stream=True,
                        stream_options={"include_usage": True}, timeout=120))
                    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                    results[i] = ("ok", text == TOK.decode(want, skip_special_tokens=True)
                                  and chunks[-1].usage.completion_tokens == 24,
                                  time.monotonic() - t0)
            except openai.RateLimitError as e:
                results[i] = ("refused", e.body["type"] == "rate_limit_error",
                              time.monotonic() - t0)
            except grpc.RpcError as e:
                results[i] = ("refused", e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
                              time.monotonic() - t0)

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            # CAP clients (half of them HTTP) fill the cap, then the rest arrive.
            futures = [pool.submit(one, i) for i in range(CAP)]
            wait_for(lambda: server.server.service.open_streams == CAP, timeout=60,
                     what="the cap to fill")
            futures += [pool.submit(one, i) for i in range(CAP, CLIENTS)]
            wait_for(lambda: len(results) == CLIENTS - CAP, timeout=60,
                     what="the refusals")
            assert server.server.service.open_streams == CAP
            gate.set()
            for f in futures:
                f.result()
        grpc_client.close()
        refused = [r for r in results.values() if r[0] == "refused"]
        done = [r for r in results.values() if r[0] == "ok"]
        assert len(refused) == CLIENTS - CAP and len(done) == CAP
        assert all(r[1] for r in results.values())  # right outputs, right error kinds
        assert max(r[2] for r in refused) < 10  # answered while the engine was held
        assert sorted(i for i, r in results.items() if r[0] == "refused") == list(
            range(CAP, CLIENTS))  # both doors' clients (even: HTTP, odd: gRPC) hit one cap
        assert server.server.service.open_streams == 0


def _open_stream(port: int, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(data)).encode() +
                 b"\r\n\r\n" + data)
    return sock


def test_clients_that_hang_up_free_their_pages(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.01), http_port=0) as server:
        port = server.server.http.port
        engine = server.backend.engine
        socks = []
        for i in range(6):
            sock = _open_stream(port, {"model": "mock", "prompt": f"p{i}", "max_tokens": 200,
                                       "stream": True})
            buffer = b""
            while b"data: {" not in buffer:  # streaming: a first token arrived
                buffer += sock.recv(65536)
            socks.append(sock)
        # A non-streamed request is watched for a hang-up too.
        socks.append(_open_stream(port, {"model": "mock", "prompt": "q", "max_tokens": 200}))
        wait_for(lambda: len(engine.running) == 7, what="7 running requests")
        assert scrape(server.metrics_url)["coserve_kv_pages_used"] > 0
        step = engine.num_steps
        for sock in socks:
            sock.close()
        wait_for(lambda: scrape(server.metrics_url)["coserve_kv_pages_used"] == 0,
                 interval=0.005, what="the pages to be freed")
        # Aborted, not finished: 200 tokens would take 200 steps.
        # (The test's own polling of the metrics endpoint takes a few of these 10 ms steps.)
        assert engine.num_steps - step < 10
        assert not engine.running and not engine.waiting
        assert server.server.service.open_streams == 0
        metrics = scrape(server.metrics_url)
        assert metrics['coserve_requests_total{outcome="cancelled"}'] == 7


def test_serve_command_opens_both_doors_and_drains(tmp_path):
    proc = ServerProcess(["--mock-engine", "{}", "--http-port", "0", "--state-dir",
                          str(tmp_path)])
    try:
        address = proc.address()
        url = wait_for(lambda: (m := re.search(r"OpenAI-compatible API on (\S+)",
                                               proc.output)) and m.group(1))
        http = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert http.completions.create(model="mock", prompt="hi",
                                       max_tokens=3).usage.completion_tokens == 3
        with Client(address) as c:
            assert len(c.generate("hi", max_tokens=3).token_ids) == 3
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output
    finally:
        proc.kill()


def test_a_drain_lets_http_streams_finish_and_refuses_new_ones(tmp_path):
    server = ServerThread(mock_backend(step_delay=0.02), config(tmp_path, http_port=0)).start()
    http = openai.OpenAI(base_url=server.http_url, api_key="x", max_retries=0)
    stream = http.completions.create(model="mock", prompt="long", max_tokens=40, seed=1,
                                     stream=True)
    first = next(iter(stream))
    codes = {}
    drainer = threading.Thread(target=lambda: codes.setdefault("exit", server.drain()))
    drainer.start()
    wait_for(lambda: server.server.service.draining)
    try:
        http.completions.create(model="mock", prompt="late", max_tokens=1)
        raise AssertionError("a request during a drain was served")
    except openai.APIStatusError as e:
        assert e.status_code == 503 and e.body["code"] == "service_unavailable"
    text = first.choices[0].text + "".join(ch.choices[0].text for ch in stream)
    want = MockEngine.expected_output(TOK.encode("long"), SamplingParams(max_tokens=40, seed=1))
    assert text == TOK.decode(want, skip_special_tokens=True)
    drainer.join(60)
    assert codes["exit"] == 0


def test_a_device_failure_ends_http_streams_with_an_error_event(tmp_path):
    server = ServerThread(mock_backend(step_delay=0.01, fail_at_step=5),
                          config(tmp_path, http_port=0)).start()
    try:
        http = openai.OpenAI(base_url=server.http_url, api_key="x", max_retries=0)
        try:
            list(http.completions.create(model="mock", prompt="doomed", max_tokens=50,
                                         stream=True))
            raise AssertionError("the stream ended without an error")
        except openai.APIError as e:  # the SSE error event, raised by the client
            assert "engine failed" in str(e)
        assert server.join(30) == 1
    finally:
        server.drain()
