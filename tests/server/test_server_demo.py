"""`make demo` in its quick form, end to end in a subprocess, with its summary checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from suite_flags import users_environment

from server_support import ROOT


def test_quick_demo_summary_is_sane(tmp_path):
    out = tmp_path / "summary.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "server.demo", "--quick", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=users_environment()  # as `make demo` runs, not as the suite
                          | {"TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== summary ===" in proc.stdout and "server stopped (exit code 0)" in proc.stdout
    s = json.loads(out.read_text())
    streams = s["streams"]
    # Every stream either completes with its whole output or is refused at admission.
    assert streams["completed"] == streams["complete_outputs"] > 0
    assert streams["completed"] + streams["refused"] == streams["requested"]
    assert streams["errors"] == [] and streams["tokens"] >= 8 * streams["completed"]
    assert 0.0 <= s["slo"]["attainment"] <= 1.0
    for metric in ("ttft_s", "tpot_s"):
        assert 0 < s[metric]["p50"] <= s[metric]["p99"] < 60
    ft = s["finetune"]
    assert ft["state"] == 3 and ft["steps"] > 0 and ft["tokens_per_s"] > 0
    assert ft["loss_end"] < ft["loss_start"]  # it learns
    assert s["accuracy_after"]["chars"] >= s["accuracy_before"]["chars"]
    # The printed curl line reached the demo's HTTP API.
    assert s["http"]["curl"] in proc.stdout and s["http"]["completion_tokens"] == 16
    # The server's state (job records, the adapter) went with the demo.
    assert not [p for p in os.listdir(scratch) if p.startswith("coserve-demo-")]


def test_a_server_that_fails_to_start_leaves_no_demo_state(tmp_path, monkeypatch):
    """The demo's state directory goes on the error path too, not only after a drain."""
    import tempfile
    from types import SimpleNamespace

    import server.app
    import server.engine_api
    from server import demo

    engine = SimpleNamespace(buckets=[8], finetune_unit="sample")
    monkeypatch.setattr(server.engine_api, "real_backend",
                        lambda *args, **kwargs: SimpleNamespace(engine=engine))

    class FailingServer:
        def __init__(self, backend, config):
            self.state_dir = config.state_dir

        def start(self):
            assert os.path.isdir(os.path.dirname(self.state_dir))  # made before the start
            raise OSError("address already in use")

    monkeypatch.setattr(server.app, "ServerThread", FailingServer)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="address already in use"):
        demo.main(["--quick", "--model", str(tmp_path / "unused"), "--no-warmup"])
    assert os.listdir(tmp_path) == []
