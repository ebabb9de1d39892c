"""Helpers for the server tests: servers on background threads, metrics, certificates."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from server.app import ServerConfig, ServerThread
from server.mock_engine import mock_backend
from server.service import Limits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(tmp_path, **overrides) -> ServerConfig:
    """A loopback config on free ports with roots under ``tmp_path``."""
    for name in ("data", "adapters", "state"):
        os.makedirs(tmp_path / name, exist_ok=True)
    fields = dict(port=0, metrics_port=0, data_root=str(tmp_path / "data"),
                  adapter_root=str(tmp_path / "adapters"), state_dir=str(tmp_path / "state"),
                  drain_timeout=10.0, fatal_grace=0.5, tick_interval=0.05)
    fields.update(overrides)
    return ServerConfig(**fields)


@contextlib.contextmanager
def mock_server(tmp_path, engine: dict | None = None, limits: Limits | None = None,
                **overrides):
    """A server over a MockEngine on a background thread; drained on exit."""
    cfg = config(tmp_path, limits=limits or Limits(), **overrides)
    server = ServerThread(mock_backend(**(engine or {})), cfg).start()
    try:
        yield server
    finally:
        server.drain()


def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels, as in the exposition text) -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Polls ``predicate`` until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """``coserve serve`` in a subprocess; its output is collected on a thread."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def address(self, timeout: float = 300.0) -> str:
        def found():
            assert self.proc.poll() is None or any("serving on" in x for x in self.lines), \
                self.output
            m = re.search(r"coserve: serving on (\S+)", self.output)
            return m and m.group(1)
        return wait_for(found, timeout, 0.05, "the server to listen")

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def make_certificates(directory) -> dict[str, str]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client one."""
    d = str(directory)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=coserve test CA")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {k: os.path.join(d, k) for k in ("ca.pem", "server.pem", "server.key",
                                            "client.pem", "client.key")}
