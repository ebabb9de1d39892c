"""The server process: gRPC (grpc.aio) and, with ``http_port``, the OpenAI-compatible HTTP
API (:mod:`server.http`) in front, on one event loop; the engine on its own thread behind.

:class:`CoserveServer` wires the servicer, health, reflection, auth, TLS and metrics
together (the HTTP door reuses the same service state, tokens and metrics) and owns the
shutdown paths:

* **Drain** (SIGTERM, SIGINT, :meth:`CoserveServer.request_drain`): stop admitting
  (UNAVAILABLE, health NOT_SERVING), let in-flight streams finish within
  ``drain_timeout``, end the rest, checkpoint running jobs, stop, exit code 0.
* **Device failure** (``engine.step()`` raised): health NOT_SERVING, every stream
  fails with UNAVAILABLE, and after ``fatal_grace`` seconds the server stops with exit
  code 1, so the process exits non-zero and its supervisor restarts it.

:func:`serve` runs one in the foreground (the ``coserve serve`` command);
:class:`ServerThread` runs one on a background thread (tests, the demo).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import Auth, AuthInterceptor, TokenStore
from .bridge import EngineLoop
from .engine_api import Backend
from .metrics import Metrics
from .proto import coserve_pb2 as pb
from .rpc import add_servicer
from .service import CoserveService, Limits, Roots

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coserve"].full_name
MAX_MESSAGE_BYTES = 64 << 20  # inline datasets can be large


@dataclasses.dataclass
class ServerConfig:
    """Everything about a server except its engine."""

    host: str = "127.0.0.1"
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int | None = None
    """Prometheus endpoint port; None disables it, 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    tokens_file: str | None = None
    """``TOKEN TENANT`` lines; None serves without authentication (one tenant)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """With a CA, clients must present a certificate it signed (mutual TLS)."""
    data_root: str | None = None
    adapter_root: str | None = None
    state_dir: str | None = None
    """Job specs and checkpoints; without it jobs do not survive a restart."""
    profile_dir: str | None = None
    """Profile root (the Profile RPC's ``dir`` is relative to it); default ``profiles/``
    under ``state_dir``."""
    profile_steps: int = 20
    """With ``profile_dir``, the server traces this many engine steps once it is warm
    (into ``profile_dir``); 0 traces nothing at start-up."""
    limits: Limits = dataclasses.field(default_factory=Limits)
    drain_timeout: float = 30.0
    """Seconds a drain waits for in-flight streams before ending them."""
    fatal_grace: float = 1.0
    """Seconds between a device failure and the stop (time for errors to reach clients)."""
    tick_interval: float = 0.5
    """Seconds between job-progress samples for metrics and job bookkeeping."""
    http_port: int | None = None
    """OpenAI-compatible HTTP API port (on ``host``); None: no HTTP door, 0: a free port."""
    served_model_name: str | None = None
    """The base model's name in the HTTP API (default: the model directory's name)."""
    http_max_body_bytes: int = 4 << 20
    """Largest JSON request body the HTTP API reads (413 above it)."""
    http_max_upload_bytes: int = 64 << 20
    """Largest file upload (``POST /v1/files``)."""


class CoserveServer:
    """One gRPC server over one engine."""

    def __init__(self, backend: Backend, config: ServerConfig):
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if config.tls_client_ca and not config.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        self.backend = backend
        self.config = config
        self.metrics = Metrics()
        store = TokenStore.from_file(config.tokens_file) if config.tokens_file else None
        self.auth = Auth(store)
        self.bridge = EngineLoop(backend.engine, self.metrics, on_fatal=self._on_fatal_thread,
                                 tick_interval=config.tick_interval)
        self.service = CoserveService(
            backend, self.bridge, self.metrics, self.auth, config.limits,
            Roots(config.data_root, config.adapter_root, config.state_dir,
                  config.profile_dir or (os.path.join(config.state_dir, "profiles")
                                         if config.state_dir else None)))
        self.bridge.on_tick = self.service.tick
        self.health = health.aio.HealthServicer()
        self.http = None  # server.http.app.HttpServer, when config.http_port is set
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.exit_code: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Future | None = None

    async def start(self) -> None:
        """Starts the engine thread, resumes persisted jobs, and starts listening."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.service._loop = self._loop
        interceptors = [AuthInterceptor(self.auth)] if self.auth.enabled else []
        self._server = server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0)])
        add_servicer(self.service, server)  # unparsable requests: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert:
            server_credentials = grpc.ssl_server_credentials(
                [(_read(self.config.tls_key), _read(self.config.tls_cert))],
                root_certificates=_read(self.config.tls_client_ca)
                if self.config.tls_client_ca else None,
                require_client_auth=bool(self.config.tls_client_ca))
            self.port = server.add_secure_port(address, server_credentials)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.bridge.start()
        if self.config.profile_dir and self.config.profile_steps > 0:
            directory, steps = self.config.profile_dir, self.config.profile_steps
            await self.bridge.call(lambda e: e.start_profile(directory, steps))
        await self.service.resume_jobs()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port,
                                                   self.config.metrics_host)
        if self.config.http_port is not None:
            from .http.app import HttpServer, make_context
            from .http.context import HttpLimits

            ctx = make_context(self.service, self.config.served_model_name,
                               HttpLimits(self.config.http_max_body_bytes,
                                          self.config.http_max_upload_bytes))
            self.http = HttpServer(ctx, self.config.host, self.config.http_port,
                                   self.config.tls_cert, self.config.tls_key,
                                   self.config.tls_client_ca)
            await self.http.start()
            log.info("HTTP API on %s:%s", self.config.host, self.http.port)
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.healthy.set(1)
        log.info("serving on %s:%s", self.config.host, self.port)

    async def wait(self) -> int:
        """Waits until the server has stopped; returns the process exit code."""
        await self._stopped.wait()
        return self.exit_code or 0

    def request_drain(self) -> None:
        """Starts a drain (from the loop thread: signal handlers, ``call_soon_threadsafe``)."""
        if not self._stopping:
            self._stopping = True
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        log.info("draining: no new requests; waiting up to %.0fs for %d stream(s)",
                 self.config.drain_timeout, self.service.open_streams)
        self.service.draining = True
        self.metrics.healthy.set(0)
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.service.streams_idle.wait(), self.config.drain_timeout)
        except TimeoutError:
            log.warning("drain timeout: ending %d stream(s)", self.service.open_streams)
            self.service.end_streams("the server shut down before the request finished")
        try:
            for name, step in await self.service.checkpoint_running_jobs():
                log.info("job %s checkpointed at step %s", name, step)
        except Exception as e:  # a failed engine has nothing left to save
            log.error("could not checkpoint jobs: %s", e)
        await self._shutdown(0)

    def _on_fatal_thread(self, error: BaseException) -> None:
        """Engine thread: a step raised."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_fatal, error)

    def _on_fatal(self, error: BaseException) -> None:
        if self._stopping:
            self.exit_code = 1
            return
        self._stopping = True
        self.service.draining = True

        async def fail() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(self.config.fatal_grace)
            await self._shutdown(1)

        self._task = asyncio.ensure_future(fail())  # a reference keeps it from GC

    async def _shutdown(self, code: int) -> None:
        self.exit_code = max(self.exit_code or 0, code)
        if self.http is not None:
            await self.http.stop()
        await self._server.stop(grace=1.0)
        await asyncio.to_thread(self.bridge.stop)
        self.metrics.close()
        log.info("stopped (exit code %d)", self.exit_code)
        self._stopped.set()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def serve(backend: Backend, config: ServerConfig, announce=print) -> int:
    """Serves in the foreground until SIGTERM/SIGINT (drain) or a device failure."""

    async def main() -> int:
        server = CoserveServer(backend, config)
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_drain)
        announce(f"coserve: serving on {config.host}:{server.port}")
        if server.http is not None:
            scheme = "https" if config.tls_cert else "http"
            announce(f"coserve: OpenAI-compatible API on {scheme}://{config.host}:"
                     f"{server.http.port}/v1")
        if server.metrics_port is not None:
            announce(f"coserve: metrics on http://{config.metrics_host}:{server.metrics_port}"
                     "/metrics")
        return await server.wait()

    return asyncio.run(main())


class ServerThread:
    """A server on a background thread with its own event loop (tests, the demo)."""

    def __init__(self, backend: Backend, config: ServerConfig):
        self.backend = backend
        self.config = config
        self.server: CoserveServer | None = None
        self.exit_code: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="coserve-server", daemon=True)

    def start(self, timeout: float = 300.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1``), with ``http_port`` set."""
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.host}:{self.server.http.port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.metrics_host}:{self.server.metrics_port}/metrics"

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.server = CoserveServer(self.backend, self.config)
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.exit_code = await self.server.wait()

    def drain(self, timeout: float = 120.0) -> int | None:
        """Drains and stops the server; returns its exit code."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_drain)
        return self.join(timeout)

    def join(self, timeout: float = 120.0) -> int | None:
        self._thread.join(timeout)
        return self.exit_code

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.drain()
