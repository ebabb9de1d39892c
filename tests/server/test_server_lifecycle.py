"""Shutdown paths: SIGTERM drains (streams finish, jobs are checkpointed and resume after
a restart), a drain that runs out of time, and a device failure (NOT_SERVING, exit 1)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc

from server.app import ServerThread
from server.client import Client, collect, finetune_request, generate_request
from server.mock_engine import mock_backend
from server.proto import coserve_pb2 as pb

from server_support import ServerProcess, config, mock_server, wait_for

RECORDS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]


def status(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _checkpoints(state_dir) -> list[int]:
    jobs = os.path.join(state_dir, "jobs")
    found = []
    for job in os.listdir(jobs) if os.path.isdir(jobs) else ():
        ckpt = os.path.join(jobs, job, "checkpoint")
        found += [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return found


def test_drain_finishes_streams_checkpoints_jobs_and_they_resume(tmp_path):
    cfg = config(tmp_path)
    server = ServerThread(mock_backend(step_delay=0.02), cfg).start()
    client = Client(server.address)
    job = client.submit_finetune(finetune_request("durable", records=RECORDS,
                                                  max_steps=10**6, checkpoint_every=10**5))
    assert job.resumed_from_step == 0
    call = client.stream(generate_request([5, 6], max_tokens=40))
    next(call)
    wait_for(lambda: client.get_job("durable").step >= 3)
    codes = {}
    drained = threading.Thread(target=lambda: codes.setdefault("exit", server.drain()))
    drained.start()
    # New work is refused while the stream in flight runs to its end.
    wait_for(lambda: status(lambda: client.generate([5], max_tokens=1)) ==
             grpc.StatusCode.UNAVAILABLE)
    assert status(lambda: client.submit_finetune(finetune_request(
        "late", records=RECORDS, max_steps=1))) == grpc.StatusCode.UNAVAILABLE
    assert client.health() == "NOT_SERVING"
    done = collect(call)
    assert len(done.token_ids) == 40 and done.result.finish_reason == "length"
    drained.join(30)
    assert codes["exit"] == 0
    saved = _checkpoints(cfg.state_dir)
    assert saved and max(saved) >= 3  # the drain saved the job, not only every 10**5 steps
    client.close()

    # Started again on the same state directory, the job resumes from that checkpoint.
    with ServerThread(mock_backend(step_delay=0.02), cfg) as server, \
            Client(server.address) as client:
        job = client.get_job("durable")
        assert job.resumed_from_step == max(saved) and job.state == pb.JOB_STATE_RUNNING
        assert job.step >= max(saved)
        client.cancel_job("durable")
    # A cancelled job stays cancelled across restarts.
    with ServerThread(mock_backend(), cfg) as server, Client(server.address) as client:
        assert client.get_job("durable").state == pb.JOB_STATE_CANCELLED


def test_drain_timeout_ends_streams(tmp_path):
    with mock_server(tmp_path, engine=dict(step_delay=0.02), drain_timeout=0.3) as server, \
            Client(server.address) as client:
        call = client.stream(generate_request([5], max_tokens=200))
        next(call)
        t0 = time.monotonic()
        assert server.drain() == 0
        assert time.monotonic() - t0 < 10
        assert status(lambda: collect(call)) == grpc.StatusCode.UNAVAILABLE


def test_device_failure_stops_serving_with_exit_code_1(tmp_path):
    cfg = config(tmp_path, fatal_grace=1.5)
    server = ServerThread(mock_backend(step_delay=0.01, fail_at_step=20), cfg).start()
    client = Client(server.address)
    call = client.stream(generate_request([5], max_tokens=100))
    try:
        collect(call)
        raise AssertionError("the stream should have failed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in e.details()
    assert client.health() == "NOT_SERVING"
    assert status(lambda: client.generate([5], max_tokens=2)) == grpc.StatusCode.UNAVAILABLE
    assert server.join(30) == 1
    client.close()


def test_process_exit_codes(tmp_path):
    """The real entry point: SIGTERM drains and exits 0; a device failure exits 1."""
    for d in ("state", "state2"):
        (tmp_path / d).mkdir()
    proc = ServerProcess(["--mock-engine", json.dumps({"step_delay": 0.02}),
                          "--state-dir", str(tmp_path / "state")])
    try:
        address = proc.address(60)
        with Client(address) as client:
            call = client.stream(generate_request([5], max_tokens=30))
            next(call)
            proc.proc.send_signal(signal.SIGTERM)
            assert len(collect(call).token_ids) == 30
        assert proc.wait(30) == 0, proc.output
    finally:
        proc.kill()
    proc = ServerProcess(["--mock-engine", json.dumps({"fail_at_step": 3}),
                          "--state-dir", str(tmp_path / "state2")])
    try:
        with Client(proc.address(60)) as client:
            assert status(lambda: client.generate([5], max_tokens=10)) == \
                grpc.StatusCode.UNAVAILABLE
        assert proc.wait(30) == 1, proc.output
        assert "simulated device failure" in proc.output
    finally:
        proc.kill()
