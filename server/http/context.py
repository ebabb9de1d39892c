"""What every HTTP route reaches: the gRPC service's state (one server), the stores of
files and jobs, and the caller's tenant from the bearer token."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Annotated

from fastapi import Depends, Request

from ..auth import internal_name
from ..engine_api import Backend
from ..service import CoserveService
from .errors import HttpError
from .files import FileStore
from .jobs import JobStore


@dataclasses.dataclass
class HttpLimits:
    """Sizes the HTTP door accepts; larger bodies are answered 413 before they are read."""

    max_body_bytes: int = 4 << 20
    """A JSON request body."""
    max_upload_bytes: int = 64 << 20
    """A file upload (``POST /v1/files``)."""


@dataclasses.dataclass
class HttpContext:
    """The server state behind the routes (the same objects the gRPC service uses)."""

    service: CoserveService
    model_id: str
    """The base model's name in ``/v1/models`` and in requests' ``model``."""
    limits: HttpLimits
    files: FileStore
    jobs: JobStore
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def backend(self) -> Backend:
        return self.service.backend

    def adapter_for(self, tenant: str, model: str) -> str | None:
        """The engine's adapter name for a request's ``model`` (None: the base model).
        Whether the adapter exists is checked on the engine thread, when the request is
        added (an adapter can come and go in between)."""
        if model == self.model_id:
            return None
        try:
            return internal_name(tenant, model, "model")
        except ValueError:
            raise model_not_found(model) from None

    def max_model_len(self) -> int | None:
        # The engine's derived length (the config's, capped by the model's limit).
        return getattr(self.backend.engine, "max_model_len", None)


def model_not_found(model: str) -> HttpError:
    return HttpError(404, f"model: no model or adapter named {model!r}", "model",
                     "model_not_found")


def served_model_name(backend: Backend, name: str | None) -> str:
    """``--served-model-name``, else the model directory's name (``mock`` for the mock)."""
    if name:
        return name
    path = backend.model_name.rstrip("/")
    return os.path.basename(path) or "coserve"


def context(request: Request) -> HttpContext:
    return request.app.state.ctx


def tenant(request: Request) -> str:
    """The caller's tenant (401 without a valid ``Authorization: Bearer`` token)."""
    auth = context(request).service.auth
    header = request.headers.get("authorization")
    found = auth.tenant_for([("authorization", header)] if header else [])
    if found is None:
        raise HttpError(401, "missing or invalid API key (header 'Authorization: Bearer "
                        "TOKEN')", None, "invalid_api_key")
    return found


Ctx = Annotated[HttpContext, Depends(context)]
"""A route parameter: the server state."""
Tenant = Annotated[str, Depends(tenant)]
"""A route parameter: the caller's tenant."""
