"""OpenAI's error body and the HTTP status of every error the server can raise.

Every error is answered as OpenAI answers it::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_value"}}

Engine and service errors are first classified as over gRPC (:func:`server.service.classify`,
so both front doors agree on what an error is), then the gRPC status is mapped to HTTP.
"""

from __future__ import annotations

import re

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..service import classify

# gRPC status -> (HTTP status, OpenAI error type, code)
_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
}
_TYPE_BY_HTTP = {400: "invalid_request_error", 401: "authentication_error",
                 404: "invalid_request_error", 405: "invalid_request_error",
                 409: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 503: "service_unavailable_error"}
# "field: ..." or "field must ..." at the start of a message names the parameter.
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*)(?::| must | is | has )")


class HttpError(Exception):
    """An error to answer with: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPE_BY_HTTP.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_exception(error: BaseException) -> HttpError:
    """The HTTP error of any exception a handler or an engine command raised."""
    if isinstance(error, HttpError):
        return error
    status, message = classify(error)
    http_status, type_, code = _BY_STATUS.get(status, (500, "server_error", "internal_error"))
    match = _PARAM.match(message)
    return HttpError(http_status, message, match.group(1) if match else None, code, type_)


def validation_error(error: RequestValidationError) -> HttpError:
    """A body that is not JSON (400) or does not fit the schema (422), naming the field."""
    errors = error.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return HttpError(400, f"the request body is not valid JSON: {detail}".rstrip(": "),
                         None, "invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return HttpError(422, message, param, "invalid_type" if "type" in first.get("type", "")
                     else "invalid_value")


async def handle_http_error(request: Request, error: HttpError) -> JSONResponse:
    return error.response()


async def handle_validation_error(request: Request, error: RequestValidationError
                                  ) -> JSONResponse:
    return validation_error(error).response()


_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def handle_starlette_error(request: Request, error) -> JSONResponse:
    """Routing errors (an unknown path: 404, a wrong method: 405) and a body over its
    limit (413), in OpenAI's body."""
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return HttpError(error.status_code, message, None,
                     _CODES.get(error.status_code)).response()


async def handle_any_error(request: Request, error: Exception) -> JSONResponse:
    return from_exception(error).response()
