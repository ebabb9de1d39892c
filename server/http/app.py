"""The OpenAI-compatible HTTP front door: a FastAPI app over the gRPC service's state,
served by uvicorn on the server's own event loop.

:func:`create_app` builds the app around an :class:`~server.http.context.HttpContext`;
:class:`HttpServer` runs it beside the gRPC server (``coserve serve --http-port``), on the
same asyncio loop, so both doors share one engine thread, one set of caps, tenants and
metrics, and a drain stops both.

Before a route reads a body, :class:`Gate` answers 401 to a request without a valid token
and 413 to a body over its limit (the declared ``Content-Length``, or the bytes as they
arrive), so neither costs the server more than its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service import CoserveService
from . import errors, finetuning, inference
from .context import HttpContext, HttpLimits, served_model_name
from .errors import HttpError
from .files import FileStore
from .jobs import JobStore

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/health", "/docs", "/openapi.json")
UPLOAD_PATH = "/v1/files"


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a body without a declared length grows past its limit
    (an ``HTTPException``, so FastAPI's body parsing lets it through)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class Gate:
    """ASGI middleware: bearer token and body size, checked before the body is read."""

    def __init__(self, app, ctx: HttpContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        if path not in PUBLIC_PATHS:
            auth = self.ctx.service.auth
            header = headers.get("authorization")
            if auth.tenant_for([("authorization", header)] if header else []) is None:
                return await self._refuse(send, HttpError(
                    401, "missing or invalid API key (header 'Authorization: Bearer TOKEN')",
                    None, "invalid_api_key"))
        limit = (self.ctx.limits.max_upload_bytes if path == UPLOAD_PATH
                 else self.ctx.limits.max_body_bytes)
        too_large = HttpError(413, f"the request body is larger than {limit} bytes", None,
                              "request_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, too_large)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:  # read outside FastAPI's handlers (e.g. by a streaming route)
            if not started:
                await self._refuse(send, too_large)

    @staticmethod
    async def _refuse(send, error: HttpError) -> None:
        response = error.response()
        await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - a refusal never reads the body
    return {"type": "http.disconnect"}


def create_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="coserve OpenAI-compatible API", version="1",
                  docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx
    app.include_router(inference.router)
    app.include_router(finetuning.router)
    app.add_exception_handler(HttpError, errors.handle_http_error)
    app.add_exception_handler(RequestValidationError, errors.handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, errors.handle_starlette_error)
    app.add_exception_handler(KeyError, errors.handle_any_error)
    app.add_exception_handler(ValueError, errors.handle_any_error)
    app.add_exception_handler(Exception, errors.handle_any_error)
    app.add_middleware(Gate, ctx=ctx)
    return app


def make_context(service: CoserveService, model_name: str | None = None,
                 limits: HttpLimits | None = None) -> HttpContext:
    """The HTTP door's state over a service: files and jobs under its state directory."""
    backend = service.backend
    model_id = served_model_name(backend, model_name)
    state = service.roots.state_dir
    files = FileStore(state and os.path.join(state, "files"), backend.tokenizer,
                      backend.max_train_len)
    jobs = JobStore(service, files, state and os.path.join(state, "openai_jobs"), model_id)
    return HttpContext(service=service, model_id=model_id, limits=limits or HttpLimits(),
                       files=files, jobs=jobs)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the coserve server owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The HTTP door of one :class:`server.app.CoserveServer`, on its event loop."""

    def __init__(self, ctx: HttpContext, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, ssl_client_ca: str | None = None):
        self.ctx = ctx
        self.host = host
        self.requested_port = port
        self.ssl = (ssl_certfile, ssl_keyfile)
        self.ssl_client_ca = ssl_client_ca
        """With a CA, clients must present a certificate it signed, as over gRPC."""
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))  # port 0: the kernel picks a free one
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.ctx), lifespan="off", log_level="warning",
                                access_log=False, ssl_certfile=self.ssl[0],
                                ssl_keyfile=self.ssl[1], ssl_ca_certs=self.ssl_client_ca,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if self.ssl_client_ca
                                else ssl.CERT_NONE,
                                timeout_graceful_shutdown=5, backlog=1024)
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it did not start
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the HTTP server stopped with an error")
        self._server = None
