"""Profiling and logging options: the Profile RPC (mock engine, and one real trace),
``coserve serve --profile-dir`` at start-up, ``coserve profile`` and the global
``--log-level``/``--log-json`` options."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import grpc
import pytest

from server.cli import main
from server.client import Client

from server_support import ROOT, mock_server, wait_for


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_profile_rpc_calls_start_profile_on_the_engine(tmp_path):
    root = tmp_path / "profiles"
    with mock_server(tmp_path, profile_dir=str(root), profile_steps=0) as server, \
            Client(server.address) as client:
        engine = server.backend.engine
        assert client.profile("run1", 3) == "run1"
        assert engine.profiles == [(os.path.realpath(root / "run1"), 3)]
        # A trace is running (the idle mock engine takes no steps): refused.
        assert _code(lambda: client.profile("run2", 3)) == grpc.StatusCode.FAILED_PRECONDITION
        for steps in (0, -1):
            assert _code(lambda s=steps: client.profile("run3", s)) == \
                grpc.StatusCode.INVALID_ARGUMENT
        for bad in ("../out", "/tmp/out", "a/../../out", ""):
            assert _code(lambda b=bad: client.profile(b, 3)) == \
                grpc.StatusCode.INVALID_ARGUMENT
        os.symlink(tmp_path, root / "escape")
        assert _code(lambda: client.profile("escape/x", 3)) == grpc.StatusCode.INVALID_ARGUMENT
        # Once the traced steps have run, another trace may start.
        engine.profile_steps_left = 0
        assert client.profile("run2", 5) == "run2"
        assert engine.profiles[-1] == (os.path.realpath(root / "run2"), 5)
        # The command line client.
        engine.profile_steps_left = 0
        assert main(["profile", "--server", server.address, "--dir", "cli", "--steps",
                     "2"]) == 0
        assert engine.profiles[-1] == (os.path.realpath(root / "cli"), 2)


def test_profile_root_defaults_to_state_dir_and_startup_trace(tmp_path):
    with mock_server(tmp_path) as server, Client(server.address) as client:
        assert client.profile("p", 4) == "p"
        assert server.backend.engine.profiles == [
            (os.path.realpath(tmp_path / "state" / "profiles" / "p"), 4)]
    startup = tmp_path / "startup"
    with mock_server(tmp_path / "b", profile_dir=str(startup), profile_steps=7) as server:
        assert server.backend.engine.profiles == [(str(startup), 7)]


def test_profile_command_reports_errors(tmp_path, capsys):
    with mock_server(tmp_path) as server:
        assert main(["profile", "--server", server.address, "--dir", "x", "--steps",
                     "0"]) == 1
    assert "INVALID_ARGUMENT: steps must be positive" in capsys.readouterr().err


def test_global_logging_options(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"], capture_output=True,
        text=True, cwd=ROOT, check=True).stdout
    assert "--log-level" in out and "--log-json" in out
    serve_help = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True,
        text=True, cwd=ROOT, check=True).stdout
    for flag in ("--profile-dir", "--profile-steps", "--run-dir", "--log-json"):
        assert flag in serve_help
    # A cheap command (its server is unreachable) with JSON logging on, then a record.
    proc = subprocess.run(
        [sys.executable, "-c",
         "import logging, sys; from server.cli import main; "
         "code = main(['--log-json', '--log-level', 'debug', 'jobs', '--server', "
         "'127.0.0.1:1', '--timeout', '0.2']); "
         "logging.getLogger('t').debug('hello'); sys.exit(code)"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert {"level": "DEBUG", "logger": "t", "message": "hello"}.items() <= records[-1].items()
    # On the subcommand too (serve's options are still accepted after `serve`).
    with pytest.raises(SystemExit) as e:
        main(["serve", "--log-json", "--log-level", "warning", "--help"])
    assert e.value.code == 0


def test_bad_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "loud", "jobs"])
    assert e.value.code == 2
    assert "unknown log level" in capsys.readouterr().err


def test_real_engine_trace(tmp_path):
    """Profile on the real engine: a couple of requests run the steps, the trace lands."""
    from test_server_engine import backend

    from server.app import ServerThread

    from server_support import config

    root = tmp_path / "profiles"
    cfg = config(tmp_path, profile_dir=str(root), profile_steps=0, metrics_port=None)
    with ServerThread(backend(), cfg) as server, Client(server.address) as client:
        assert client.profile("trace", 2) == "trace"
        for prompt in ("Hello", "Profiling"):
            client.generate(prompt, max_tokens=4, ignore_eos=True)

        def traces():
            return glob.glob(str(root / "trace" / "**" / "*.xplane.pb"), recursive=True)
        found = wait_for(traces, timeout=30, what="the trace file")
    with open(found[0], "rb") as f:
        assert b"coserve_step" in f.read()


def test_serve_mesh_flags_and_run_dir(tmp_path):
    """`serve --help` lists the mesh/multi-host flags; a single-process serve over a
    one-device mesh starts, answers health, and writes its TensorBoard run dir."""
    from server_support import ServerProcess

    serve_help = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True,
        text=True, cwd=ROOT, check=True).stdout
    for flag in ("--mesh", "--coordinator-address", "--num-processes", "--process-id"):
        assert flag in serve_help
    run_dir = tmp_path / "curves"
    proc = ServerProcess(["--mesh", "model=1", "--no-warmup", "--state-dir",
                          str(tmp_path / "state"), "--run-dir", str(run_dir)])
    try:
        address = proc.address(timeout=120)
        with Client(address) as client:
            assert client.health() == "SERVING"
            done = client.generate("Hi", max_tokens=2, ignore_eos=True)
            assert done.result.completion_tokens == 2
        assert run_dir.is_dir()
        proc.proc.terminate()
        assert proc.wait(60) == 0, proc.output
    finally:
        proc.kill()
