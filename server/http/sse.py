"""Server-sent events as OpenAI streams them: ``data: {json}`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

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


def stream_response(chunks: AsyncIterator[dict]) -> StreamingResponse:
    # No proxy buffering: tokens must reach the client as they are made.
    return StreamingResponse(_guarded(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
