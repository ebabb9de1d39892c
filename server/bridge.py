"""The engine thread, and the bridge between it and the asyncio side of the server.

The engine is single-threaded, so it lives on one thread that owns it completely.
The asyncio side talks to it in two ways:

* **Commands**: a function of the engine put on a thread-safe queue. The engine thread
  runs queued commands between iterations and hands each result (or exception) back to
  the awaiting coroutine with ``loop.call_soon_threadsafe``. ``post`` is the
  fire-and-forget form (aborting a request from a ``finally``: it must not await).
* **Streams**: a request's outputs go to its own ``asyncio.Queue``. The queue is
  registered by the same command that adds the request, so no output can be produced
  before someone listens; after each step the engine thread delivers all outputs in
  one ``call_soon_threadsafe`` call.

An abort posted for a request runs before the next step, so its pages are free
within one iteration. An exception from ``engine.step()`` is a device failure: every
stream gets the error, every later command fails with :class:`EngineFailed`, and
``on_fatal`` is told.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .engine_api import ServingEngine
from .metrics import Metrics

log = logging.getLogger(__name__)

_STOP = object()


class EngineFailed(RuntimeError):
    """The engine raised from ``step()``; it serves nothing any more."""


class EngineLoop:
    """Owns the engine and the thread that runs it."""

    def __init__(self, engine: ServingEngine, metrics: Metrics,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_tick: Callable[[ServingEngine], None] | None = None,
                 tick_interval: float = 0.5, idle_wait: float = 0.05):
        self.engine = engine
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.on_tick = on_tick
        self.tick_interval = tick_interval
        self.idle_wait = idle_wait
        self.failed: BaseException | None = None
        self.num_steps = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (loop, asyncio.Queue); touched only on the engine thread.
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="coserve-engine", daemon=True)
        self._last_tick = 0.0

    # ----- the asyncio side -----------------------------------------------------------------

    def start(self) -> None:
        self._update_kv()  # a scrape before the first command sees the real cache size
        self._thread.start()

    async def call(self, fn: Callable[[ServingEngine], Any]) -> Any:
        """Runs ``fn(engine)`` on the engine thread; returns its result or raises its error."""
        if self.failed is not None:
            raise EngineFailed(f"the engine failed: {self.failed}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, loop, future))
        return await future

    def post(self, fn: Callable[[ServingEngine], Any]) -> None:
        """Queues ``fn(engine)`` without waiting for it (errors are logged)."""
        self._commands.put((fn, None, None))

    def register(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 sink: asyncio.Queue) -> None:
        """Engine thread only (inside a command): routes a request's outputs to ``sink``."""
        self._sinks[request_id] = (loop, sink)

    def unregister(self, request_id: str) -> None:
        """Engine thread only (inside a command)."""
        self._sinks.pop(request_id, None)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ends the engine thread after the commands queued before this call."""
        self._commands.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ----- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self.failed is None and self.engine.has_unfinished()
                if not self._run_commands(block=not busy):
                    return
                if self.failed is None and self.engine.has_unfinished():
                    self._step()
                self._maybe_tick()
        finally:
            try:  # ends a trace in progress, flushes the engine's event files
                self.engine.close()
            except Exception:
                log.exception("closing the engine")

    def _run_commands(self, block: bool) -> bool:
        """Runs queued commands (waiting a little for one when idle); False on stop."""
        try:
            item = self._commands.get(timeout=self.idle_wait) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            self._run_command(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
        if self.failed is None:
            self._update_kv()
        return True

    def _run_command(self, fn, loop, future) -> None:
        if self.failed is not None:
            result, error = None, EngineFailed(f"the engine failed: {self.failed}")
        else:
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # handed to the caller, who maps it to a status
                result, error = None, e
        if future is None:
            if error is not None and not isinstance(error, EngineFailed):
                log.warning("engine command failed: %r", error)
            return
        loop.call_soon_threadsafe(_settle, future, result, error)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._fail(e)
            return
        now = time.monotonic()
        self.metrics.step_time.observe(time.perf_counter() - t0)
        self.num_steps += 1
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:
                continue
            loop, sink = target
            deliveries.setdefault(loop, []).append((sink, ("out", now, out)))
            if out.finished:
                del self._sinks[out.request_id]
        self._update_kv()  # before delivering: a client that saw a token sees its pages
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _update_kv(self) -> None:
        usage = self.engine.kv_usage()
        self.metrics.set_kv(usage.used_pages, usage.total_pages)

    def _maybe_tick(self) -> None:
        if self.on_tick is None or self.failed is not None:
            return
        now = time.monotonic()
        if now - self._last_tick < self.tick_interval:
            return
        self._last_tick = now
        try:
            self.on_tick(self.engine)
        except Exception:  # bookkeeping must never stop the engine
            log.exception("engine tick failed")

    def _fail(self, error: BaseException) -> None:
        log.error("engine step failed; the server stops serving: %r", error)
        self.failed = error
        self.metrics.healthy.set(0)
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, sink in self._sinks.values():
            deliveries.setdefault(loop, []).append((sink, ("error", error)))
        self._sinks.clear()
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)
        if self.on_fatal is not None:
            self.on_fatal(error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(items: list) -> None:
    for sink, event in items:
        sink.put_nowait(event)
