"""What the engine raises when it refuses a call, by kind.

Each type also subclasses the builtin the engine raised before (``ValueError`` or
``KeyError``), so ``except ValueError`` / ``except KeyError`` callers keep working. The
server maps the type, never the message, to a status (:func:`server.service.classify`;
the HTTP API maps that status on, :mod:`server.http.errors`). Messages name the field
or the thing at fault.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every refusal by the engine (never raised itself). A device failure in
    ``step`` is not one of these."""


class InvalidRequest(EngineError, ValueError):
    """Bad input: a prompt, sampling parameter, adapter or finetuning job the engine
    cannot take; the message names the field. gRPC INVALID_ARGUMENT, HTTP 400."""


class NotFound(EngineError, KeyError):
    """No request, adapter or finetuning job of that name. gRPC NOT_FOUND, HTTP 404.

    Unlike a plain ``KeyError``, ``str()`` is the message itself, not its repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class AlreadyExists(EngineError, ValueError):
    """The name is taken: an adapter loaded without ``replace``, a job or adapter of the
    same name, a request id in use. gRPC ALREADY_EXISTS, HTTP 409."""


class InUse(EngineError, ValueError):
    """The thing is busy, so the call cannot run now: an adapter that requests use, the
    adapter of a finetuning job, a job still running, a trace already being captured.
    gRPC FAILED_PRECONDITION, HTTP 400."""


class CapacityExhausted(EngineError, ValueError):
    """Every adapter slot is taken; unloading one or removing a job frees one.
    gRPC RESOURCE_EXHAUSTED, HTTP 429."""


class AdmissionError(EngineError, ValueError):
    """A request refused at admission: the queue is full, its TTFT target cannot be
    met, or the engine's mode serves no inference. gRPC RESOURCE_EXHAUSTED, HTTP 429."""
