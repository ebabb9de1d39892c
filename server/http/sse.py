"""Server-sent events as OpenAI streams them: ``data: {json}`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from .errors import HttpError, from_exception

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _guarded(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """The stream's events; an error after the headers went out becomes an error event
    (the status line is already sent), and the stream still ends with ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except HttpError as e:
        yield event(e.body())
    except Exception as e:  # never a half-written event: the client sees what went wrong
        yield event(from_exception(e).body())
    yield DONE


class _Stream(StreamingResponse):
    """A streamed response that runs ``on_close`` however it ends: finished, failed, or
    cancelled by a client that hung up, even before its body was first iterated (then
    the body's own ``finally`` never runs)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def stream_response(chunks: AsyncIterator[dict], on_close: Callable[[], None]
                    ) -> StreamingResponse:
    # No proxy buffering: tokens must reach the client as they are made.
    return _Stream(_guarded(chunks), on_close, media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
