"""Generation for the HTTP front door: one API request becomes ``n`` engine requests.

It shares everything with the gRPC ``Generate`` handler that makes the two doors one
server: the same caps (open streams, queued requests) and counters of
:class:`server.service.CoserveService`, request ids from the same sequence, the same
engine thread (:class:`server.bridge.EngineLoop`), the same metrics (TTFT, TPOT, outcomes)
and the same drain. What is HTTP's own: stop *strings* (the text is checked as it is
decoded; a match ends the choice and aborts its engine request), text deltas that never
split a UTF-8 character or show the start of a stop string early, and choices of one
request that are admitted all together or not at all.

A caller iterates :meth:`Generation.deltas`; leaving the iteration early (a client that
disconnected, a cancelled task) aborts every unfinished engine request, so its KV pages
are free before the next engine iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from coserve_jax.sampling import SamplingParams

from ..engine_api import ServingEngine, make_slo
from ..service import OUTCOMES, CoserveService, classify
from .errors import HttpError, from_exception

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ChoiceSpec:
    """One engine request of an API request."""

    prompt: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first of them, which is not returned."""


@dataclasses.dataclass
class Delta:
    """What one choice produced since the last delta."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class _Choice:
    index: int
    rid: str
    spec: ChoiceSpec
    state: str = "queued"  # queued -> running -> done (as the service counts streams)
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""
    first: float | None = None
    last: float | None = None


class TextTracker:
    """Turns a choice's growing token list into text deltas, ending it at a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = ""

    def _decode(self, tokens: list[int]) -> str:
        try:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
        except Exception:  # token ids still stream; a tokenizer quirk must not end the call
            log.exception("decoding %d tokens", len(tokens))
            return self.sent

    def feed(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The new text of ``tokens`` (all of the choice's tokens so far), and whether a
        stop string ended the choice."""
        text = self._decode(tokens)
        stopped = False
        if self.stop:
            start = max(0, len(self.sent) - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text, stopped = text[:min(hits)], True
        end = len(text)
        if not (stopped or final):
            if text.endswith("\ufffd"):  # a partial UTF-8 character: wait for its bytes
                return "", False
            end -= self._held(text)
        if not text.startswith(self.sent) or end < len(self.sent):
            return "", stopped
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta, stopped

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held


class Generation:
    """The engine requests of one API request, admitted together and streamed as deltas."""

    def __init__(self, service: CoserveService, specs: list[ChoiceSpec],
                 adapter: str | None, model: str, ttft_target: float = 0.0,
                 tpot_target: float = 0.0):
        self.service = service
        self.specs = specs
        self.adapter = adapter
        self.model = model
        self.ttft_target = ttft_target
        self.tpot_target = tpot_target
        self.arrival = time.monotonic()
        self.prompt_tokens = sum(len(s.prompt) for s in specs)
        self.completion_tokens = 0
        self._choices: list[_Choice] = []
        self._sink: asyncio.Queue = asyncio.Queue()
        self._outcome = "error"

    def _admit_or_refuse(self) -> None:
        self.service.refuse_if_draining()
        self.service.check_stream_caps(len(self.specs))

    async def start(self) -> None:
        """Admits every choice or none; raises :class:`HttpError` when refused."""
        service = self.service
        try:
            self._admit_or_refuse()
        except Exception as e:
            self._count(e)
            raise from_exception(e) from None
        # The service's counters and request ids: one set of caps for both doors.
        for index, spec in enumerate(self.specs):
            choice = _Choice(index, service.new_request_id(), spec)
            self._choices.append(choice)
            service.open_stream(choice.rid, self._sink)
        loop = asyncio.get_running_loop()
        choices, adapter, model = self._choices, self.adapter, self.model
        extra_of = self._slo_kwargs

        def add(engine: ServingEngine) -> None:
            if adapter is not None and adapter not in engine.adapters():
                raise KeyError(f"model: no model or adapter named {model!r}")
            added = []
            try:
                for choice in choices:
                    engine.add_request(choice.spec.prompt, choice.spec.params,
                                       request_id=choice.rid, adapter=adapter,
                                       **extra_of(engine))
                    added.append(choice.rid)
                    service.bridge.register(choice.rid, loop, self._sink)
            except Exception:  # all choices or none
                for rid in added:
                    service.bridge.unregister(rid)
                    engine.abort(rid)
                raise

        try:
            await service.bridge.call(add)
        except BaseException as e:
            self._outcome = _outcome(e) if isinstance(e, Exception) else "cancelled"
            # Cancelled while waiting, the command may still add them: abort (a no-op for
            # ids the engine never took; the queue runs commands in order).
            self._close_all(abort=True)
            if isinstance(e, Exception):
                raise from_exception(e) from None
            raise

    def _slo_kwargs(self, engine: ServingEngine) -> dict:
        if not self.service.slo_aware:
            return {}
        return dict(slo=make_slo(engine, self.ttft_target, self.tpot_target),
                    arrival_time=self.arrival)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yields deltas until every choice finished; ``HttpError`` (503) if the engine
        fails or a drain ends the request. Closing the iterator early aborts the rest."""
        tokenizer = self.service.backend.tokenizer
        trackers = [TextTracker(tokenizer, c.spec.stop) for c in self._choices]
        by_rid = {c.rid: c for c in self._choices}
        unfinished = len(self._choices)
        try:
            while unfinished:
                events = [await self._sink.get()]
                while not self._sink.empty():  # a slow reader gets one delta for many steps
                    events.append(self._sink.get_nowait())
                news: dict[str, list] = {}
                for event in events:
                    if event[0] != "out":  # the engine failed, or a drain ran out of time
                        self._outcome = "unavailable"
                        why = (f"the engine failed: {event[1]}" if event[0] == "error"
                               else event[1])
                        raise HttpError(503, why, code="service_unavailable")
                    _, when, out = event
                    choice = by_rid.get(out.request_id)
                    if choice is None or choice.state == "done":
                        continue
                    if choice.first is None:
                        choice.first = when
                        self.service.set_stream_state("queued", "running")
                        choice.state = "running"
                    choice.last = when
                    news.setdefault(choice.rid, []).append(out)
                for rid, outs in news.items():
                    choice = by_rid[rid]
                    delta = self._delta(choice, trackers[choice.index], outs)
                    if delta.finish_reason is not None:
                        unfinished -= 1
                    yield delta
            self._outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            self._outcome = "cancelled"
            raise
        finally:
            self._close_all(abort=True)

    def _delta(self, choice: _Choice, tracker: TextTracker, outs: list) -> Delta:
        new: list[int] = []
        logprobs: list[float] | None = None
        top: list | None = None
        reason = None
        for out in outs:
            new.extend(out.new_token_ids)
            if out.logprobs is not None:
                logprobs = (logprobs or []) + list(out.logprobs)
                top = (top or []) + list(out.top_logprobs or [[] for _ in out.logprobs])
            if out.finished:
                reason = "length" if out.finish_reason == "length" else "stop"
        choice.tokens.extend(new)
        self.completion_tokens += len(new)
        text, stopped = tracker.feed(choice.tokens, final=reason is not None)
        if stopped and reason is None:
            reason = "stop"
            self._abort(choice)  # the engine would generate on: free its pages now
        if reason is not None:
            self._finish(choice, reason)
        return Delta(choice.index, new, text, logprobs, top, reason)

    def _finish(self, choice: _Choice, reason: str) -> None:
        # Observes TTFT, TPOT, E2E and SLO metrics (the result message is gRPC's).
        self.service.generation_result(
            reason, len(choice.spec.prompt), len(choice.tokens), self.arrival, choice.first,
            choice.last, self.ttft_target, self.tpot_target)
        self.service.set_stream_state(choice.state, "done")
        choice.state = "done"

    def _abort(self, choice: _Choice) -> None:
        bridge, rid = self.service.bridge, choice.rid

        def drop(engine: ServingEngine) -> None:
            bridge.unregister(rid)
            engine.abort(rid)

        bridge.post(drop)

    def close(self) -> None:
        """Aborts what is unfinished and frees the stream slots; safe to call again (a
        streamed response calls it when it ends, in case its body was never iterated)."""
        if self._choices and self._outcome == "error":
            self._outcome = "cancelled"
        self._close_all(abort=True)

    def _close_all(self, abort: bool) -> None:
        """Aborts unfinished choices and gives their stream slots back (once)."""
        choices, self._choices = self._choices, []
        for choice in choices:
            self.service.close_stream(choice.rid,
                                      "closed" if choice.state == "done" else choice.state)
        if choices:
            self.service.metrics.requests.labels(self._outcome).inc()
        # Counted before the pages go back: whoever sees them freed sees the streams closed.
        for choice in choices:
            if choice.state != "done" and abort:
                self._abort(choice)

    def _count(self, error: Exception) -> None:
        self.service.metrics.requests.labels(_outcome(error)).inc()


def _outcome(error: Exception) -> str:
    """The ``coserve_requests_total`` outcome of an error, as gRPC counts it."""
    code, _ = classify(error)
    return OUTCOMES.get(code, "error")
