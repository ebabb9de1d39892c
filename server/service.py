"""The ``coserve.v1.Coserve`` servicer: requests in, engine commands out, statuses back.

Every handler runs on the asyncio loop and reaches the engine only through
:class:`server.bridge.EngineLoop`. Errors become statuses by their type, never their
message (:func:`classify`): the engine's :mod:`coserve_jax.errors` each have their code,
any other ``ValueError`` is INVALID_ARGUMENT (messages name the field),
``KeyError``/``FileNotFoundError`` NOT_FOUND, caps RESOURCE_EXHAUSTED at once, a drain or a
failed engine UNAVAILABLE; anything unexpected is logged and answered INTERNAL, and never
affects other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import os
import time

import grpc

from coserve_jax.errors import (
    AdmissionError,
    AlreadyExists,
    CapacityExhausted,
    InUse,
    InvalidRequest,
    NotFound,
)
from coserve_jax.lora.config import LoraConfig

from . import convert
from .auth import Auth, internal_name, public_name
from .bridge import EngineFailed, EngineLoop
from .engine_api import Backend, ServingEngine, accepts_slo, checkpoint_job, make_slo
from .metrics import Metrics
from .paths import RootMissing, check_files_within, resolve_under, write_atomic
from .proto import coserve_pb2 as pb
from .proto import coserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SPEC_FILE = "request.binpb"
META_FILE = "job.json"
FINAL_FILE = "final.json"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps that answer RESOURCE_EXHAUSTED at once when reached."""

    max_streams: int = 256
    """Open Generate streams."""
    max_queue: int = 128
    """Admitted requests still waiting for their first token."""
    max_jobs: int = 4
    """Finetuning jobs queued or running."""


@dataclasses.dataclass
class Roots:
    """Where request paths may point, and where the server keeps its own state."""

    data_root: str | None = None
    adapter_root: str | None = None
    state_dir: str | None = None
    """Job specs, checkpoints and final adapters (jobs resume from here after a restart)."""
    profile_root: str | None = None
    """Directory that Profile's ``dir`` is relative to (created on first use)."""


class ServiceError(Exception):
    """A status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class JobRecord:
    """The server's record of a finetuning job (the engine knows only its internal name)."""

    tenant: str
    name: str
    internal: str
    lora: LoraConfig
    num_samples: int
    resumed_from_step: int = 0
    live: bool = True
    """The engine has it (false for jobs that finished before a restart)."""
    final: dict | None = None
    """Its last progress, once it completed, was cancelled or failed."""
    directory: str | None = None


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One of a tenant's adapters the engine holds, as both front doors list them."""

    name: str
    """Its name as the tenant knows it."""
    kind: str
    """``"loaded"`` (from a directory under the adapter root) or ``"job"`` (a finetuning
    job's, while it trains and after)."""
    lora: LoraConfig
    path: str | None = None
    """Where a loaded one came from, relative to the adapter root; None for a job's."""


# Exception type -> status, most specific first; the first match wins. The engine's
# errors come before the builtins they subclass (NotFound is a KeyError, the rest are
# ValueErrors). Messages are never looked at.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (EngineFailed, grpc.StatusCode.UNAVAILABLE),
    (RootMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdmissionError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KeyError, grpc.StatusCode.NOT_FOUND),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def classify(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status of an exception from a handler or an engine command, by its type."""
    if isinstance(error, ServiceError):
        return error.code, error.message
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            if isinstance(error, KeyError):  # KeyError's str() is the repr of its message
                return code, str(error.args[0] if error.args else error)
            return code, str(error)
    log.error("unexpected error in a handler", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


# Status -> the ``coserve_requests_total`` outcome of a refused or failed request (both
# front doors count theirs alike); any other status counts as "error".
OUTCOMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


class CoserveService(pb_grpc.CoserveServicer):
    """Streams generations and runs jobs and adapters for each tenant.

    Besides the gRPC handlers, its public methods are what the HTTP API (:mod:`server.http`)
    shares with them: stream accounting and caps, request ids, jobs and adapters by tenant.
    """

    def __init__(self, backend: Backend, bridge: EngineLoop, metrics: Metrics, auth: Auth,
                 limits: Limits, roots: Roots):
        self.backend = backend
        self.bridge = bridge
        self.metrics = metrics
        self.auth = auth
        self.limits = limits
        self.roots = roots
        self.draining = False
        self.open_streams = 0
        self.queued = 0
        self.jobs: dict[str, JobRecord] = {}  # internal name -> record
        self._reserved: set[str] = set()  # names of jobs being submitted
        self._loaded: dict[str, tuple] = {}  # internal name -> (LoraAdapter, relative path)
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()  # request ids, shared by both front doors
        self.streams_idle = asyncio.Event()
        self.streams_idle.set()
        # Live job names for the engine thread's tick; replaced whole, never mutated.
        self._live: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.slo_aware = accepts_slo(backend.engine)
        """The engine takes each request's SLO targets and arrival time."""

    # ----- helpers --------------------------------------------------------------------------

    def _tenant(self, context) -> str:
        tenant = self.auth.tenant_for(context.invocation_metadata())
        if tenant is None:  # the interceptor refuses these; never trust it blindly
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        return tenant

    async def _unary(self, context, handler, request):
        try:
            return await handler(request, self._tenant(context))
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code, message = classify(e)
            await context.abort(code, message)

    def refuse_if_draining(self) -> None:
        """Raises UNAVAILABLE once a drain began: no new streams or jobs."""
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    # ----- Generate -------------------------------------------------------------------------

    async def Generate(self, request, context):
        arrival = time.monotonic()
        try:
            tenant = self._tenant(context)
            self.refuse_if_draining()
            prompt = convert.prompt_ids(request, self.backend.tokenizer)
            params = convert.sampling_params(request.sampling)
            ttft_target, tpot_target = convert.slo_targets(request.slo)
            adapter = internal_name(tenant, request.adapter, "adapter") if request.adapter \
                else None
            self.check_stream_caps(1)
        except Exception as e:
            code, message = classify(e)
            self.metrics.requests.labels(OUTCOMES.get(code, "error")).inc()
            await context.abort(code, message)
            return

        rid = self.new_request_id()
        client_id = request.request_id or f"req-{rid}"
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        state = "queued"
        self.open_stream(rid, sink)
        outcome = "error"
        try:
            def add(engine: ServingEngine) -> None:
                if adapter is not None and adapter not in engine.adapters():
                    raise KeyError(f"adapter: no adapter named {request.adapter!r}")
                extra = {}
                if self.slo_aware:  # the engine schedules for the request's targets
                    extra = dict(slo=make_slo(engine, ttft_target, tpot_target),
                                 arrival_time=arrival)
                engine.add_request(prompt, params, request_id=rid, adapter=adapter, **extra)
                self.bridge.register(rid, loop, sink)

            try:
                await self.bridge.call(add)
            except Exception as e:
                code, message = classify(e)
                outcome = OUTCOMES.get(code, "error")
                await context.abort(code, message)
            yield pb.GenerateResponse(request_id=client_id)

            tokens: list[int] = []
            sent_text = ""
            first = last = None
            result = None
            while result is None:
                events = [await sink.get()]
                while not sink.empty():  # a slow reader gets one message for many steps
                    events.append(sink.get_nowait())
                new: list[int] = []
                for event in events:
                    if event[0] != "out":  # the engine failed, or a drain ran out of time
                        outcome = "unavailable"
                        why = (f"the engine failed: {event[1]}" if event[0] == "error"
                               else event[1])
                        await context.abort(grpc.StatusCode.UNAVAILABLE, why)
                    _, when, out = event
                    if first is None:
                        first = when
                        state = "running"
                        self.set_stream_state("queued", "running")
                    last = when
                    new.extend(out.new_token_ids)
                    if out.finished:
                        result = out.finish_reason or "length"
                tokens.extend(new)
                text = self._decode(tokens, sent_text)
                delta = ""
                # Hold back a trailing partial UTF-8 character until its bytes arrive.
                if (result is not None or not text.endswith("\ufffd")) and \
                        text.startswith(sent_text):
                    delta, sent_text = text[len(sent_text):], text
                message = pb.GenerateResponse(token_ids=new, text=delta)
                if result is not None:
                    message.result.CopyFrom(self.generation_result(
                        result, len(prompt), len(tokens), arrival, first, last,
                        ttft_target, tpot_target))
                    self.set_stream_state(state, "done")
                    state = "done"
                    outcome = "ok"
                yield message
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while waiting or writing
            # The client's own timer may cancel a moment before the server's fires.
            remaining = context.time_remaining()
            outcome = "deadline_exceeded" if remaining is not None and remaining < 0.1 \
                else "cancelled"
            raise
        finally:
            # Counted before the pages go back: whoever sees them freed sees the stream closed.
            self.close_stream(rid, state)
            self.metrics.requests.labels(outcome).inc()
            if state != "done":
                def drop(engine: ServingEngine) -> None:
                    self.bridge.unregister(rid)
                    engine.abort(rid)
                self.bridge.post(drop)

    def _decode(self, tokens: list[int], fallback: str) -> str:
        try:
            return self.backend.tokenizer.decode(tokens, skip_special_tokens=True)
        except Exception:  # token ids still stream; a tokenizer quirk must not end the call
            log.exception("decoding %d tokens", len(tokens))
            return fallback

    def generation_result(self, reason: str, prompt_len: int, n: int, arrival: float,
                          first: float, last: float, ttft_target: float,
                          tpot_target: float) -> pb.GenerateResult:
        """The result of a finished generation of ``n`` tokens (``arrival``, ``first`` and
        ``last`` token times from ``time.monotonic``); observes its TTFT, TPOT, E2E and SLO
        metrics."""
        ttft = first - arrival
        tpot = (last - first) / (n - 1) if n > 1 else 0.0
        ttft_ok = ttft_target <= 0 or ttft <= ttft_target
        tpot_ok = tpot_target <= 0 or tpot <= tpot_target
        self.metrics.ttft.observe(ttft)
        if n > 1:
            self.metrics.tpot.observe(tpot)
        self.metrics.e2e.observe(last - arrival)
        if ttft_target > 0 or tpot_target > 0:
            self.metrics.record_slo(ttft_ok and tpot_ok)
        return pb.GenerateResult(finish_reason=reason, prompt_tokens=prompt_len,
                                 completion_tokens=n, ttft_s=ttft, tpot_s=tpot,
                                 e2e_s=last - arrival, ttft_attained=ttft_ok,
                                 tpot_attained=tpot_ok, slo_attained=ttft_ok and tpot_ok)

    # Stream accounting: every engine request either door streams counts against the same
    # caps (``Limits.max_streams``, ``Limits.max_queue``) and gauges. A stream is opened
    # "queued", moves to "running" at its first token and to "done" when it finished, and
    # is closed exactly once.

    def new_request_id(self) -> str:
        """A fresh engine request id, unique across both front doors."""
        return f"{next(self._ids)}"

    def check_stream_caps(self, n: int) -> None:
        """Raises RESOURCE_EXHAUSTED unless ``n`` more streams fit under the caps."""
        if self.open_streams + n > self.limits.max_streams:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many open streams (the cap is "
                               f"{self.limits.max_streams}); retry later")
        if self.queued + n > self.limits.max_queue:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the request queue is full ({self.limits.max_queue} "
                               "waiting); retry later")

    def open_stream(self, rid: str, sink: asyncio.Queue) -> None:
        """Counts a new queued stream whose engine events go to ``sink`` (a drain that runs
        out of time ends it through there)."""
        self._streams[rid] = sink
        self.open_streams += 1
        self.queued += 1
        self.streams_idle.clear()
        self.metrics.streams.set(self.open_streams)
        self.metrics.queue_length.set(self.queued)

    def set_stream_state(self, old: str, new: str) -> None:
        """Moves a stream from state ``old`` to ``new`` in the queue and running gauges."""
        if old == "queued":
            self.queued -= 1
        elif old == "running":
            self.metrics.running.dec()
        if new == "running":
            self.metrics.running.inc()
        self.metrics.queue_length.set(self.queued)

    def close_stream(self, rid: str, state: str) -> None:
        """Gives back the slot of a stream last in ``state`` (once per opened stream)."""
        self._streams.pop(rid, None)
        self.set_stream_state(state, "closed")
        self.open_streams -= 1
        self.metrics.streams.set(self.open_streams)
        if self.open_streams == 0:
            self.streams_idle.set()

    def end_streams(self, reason: str) -> None:
        """Ends every open stream with UNAVAILABLE (a drain that ran out of time)."""
        for sink in self._streams.values():
            sink.put_nowait(("shutdown", reason))

    # ----- finetuning jobs ------------------------------------------------------------------

    def _job_dir(self, internal: str) -> str | None:
        if not self.roots.state_dir:
            return None
        return os.path.join(self.roots.state_dir, "jobs", internal)

    def job_record(self, tenant: str, name: str) -> JobRecord:
        """The record of the tenant's job ``name``; KeyError (NOT_FOUND) if it has none."""
        internal = internal_name(tenant, name, "name")
        record = self.jobs.get(internal)
        if record is None or record.tenant != tenant:
            raise KeyError(f"name: no job named {name!r}")
        return record

    def _active_jobs(self) -> int:
        return len(self._reserved) + sum(r.live and r.final is None for r in self.jobs.values())

    async def SubmitFinetune(self, request, context):
        return await self._unary(context, self.submit_job, request)

    async def submit_job(self, request: pb.SubmitFinetuneRequest, tenant: str) -> pb.Job:
        """Starts the tenant's finetuning job (under the job cap; names are shared with
        adapters) and persists its spec, so it resumes after a restart."""
        self.refuse_if_draining()
        internal = internal_name(tenant, request.name, "name")
        if internal in self.jobs or internal in self._reserved or internal in self._loaded:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                               f"name: an adapter or job named {request.name!r} already exists")
        if self._active_jobs() >= self.limits.max_jobs:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.limits.max_jobs} finetuning jobs are already running "
                               "(the cap); retry later")
        self._reserved.add(internal)
        try:
            record = await self._start_job(request, tenant, internal)
        finally:
            self._reserved.discard(internal)
        directory = record.directory
        if directory is not None:  # persisted only once the engine took it
            os.makedirs(directory, exist_ok=True)
            write_atomic(os.path.join(directory, SPEC_FILE), request.SerializeToString())
            write_atomic(os.path.join(directory, META_FILE), json.dumps(
                {"tenant": tenant, "name": request.name,
                 "num_samples": record.num_samples}).encode())
        return await self._job_message(record)

    async def _start_job(self, request, tenant: str, internal: str) -> JobRecord:
        """Builds the job (tokenizing off the loop) and hands it to the engine."""
        directory = self._job_dir(internal)
        job = await asyncio.to_thread(
            convert.finetune_job, request, internal, self.backend.tokenizer,
            self.backend.max_train_len, self.backend.max_lora_rank, self.roots.data_root,
            None if directory is None else os.path.join(directory, "checkpoint"),
            None if directory is None else os.path.join(directory, "adapter"))
        progress = await self.bridge.call(lambda engine: engine.submit_job(job))
        record = JobRecord(tenant=tenant, name=request.name, internal=internal, lora=job.lora,
                           num_samples=len(job.dataset), resumed_from_step=progress.step,
                           directory=directory)
        self.jobs[internal] = record
        self._refresh_live()
        if progress.state in convert.TERMINAL_STATES:
            self._finalize(record, convert.progress_dict(progress))
        return record

    def _refresh_live(self) -> None:
        self._live = frozenset(i for i, r in self.jobs.items() if r.live and r.final is None)

    def _finalize(self, record: JobRecord, progress: dict) -> None:
        """Records a job's last state (on disk too, so a restart does not resume it)."""
        record.final = progress
        self._refresh_live()
        self.metrics.job_tokens_per_s.labels(record.tenant, record.name).set(0.0)
        if record.directory is not None and os.path.isdir(record.directory):
            write_atomic(os.path.join(record.directory, FINAL_FILE),
                          json.dumps(progress).encode())

    async def job_progress(self, record: JobRecord) -> dict:
        """A job's progress (:func:`convert.progress_dict`); its last one once it ended."""
        if record.final is not None or not record.live:
            return record.final or {}
        progress = await self.bridge.call(lambda e: e.job_progress(record.internal))
        snapshot = convert.progress_dict(progress)
        if snapshot["state"] in convert.TERMINAL_STATES and record.final is None:
            self._finalize(record, snapshot)
        return snapshot

    async def _job_message(self, record: JobRecord) -> pb.Job:
        progress = await self.job_progress(record)
        return convert.job_message(record.name, progress, record.resumed_from_step,
                                   record.num_samples)

    async def GetJob(self, request, context):
        async def get(request, tenant):
            return await self._job_message(self.job_record(tenant, request.name))
        return await self._unary(context, get, request)

    async def ListJobs(self, request, context):
        async def list_jobs(request, tenant):
            mine = [r for r in self.jobs.values() if r.tenant == tenant]
            jobs = [await self._job_message(r) for r in sorted(mine, key=lambda r: r.name)]
            return pb.ListJobsResponse(jobs=jobs)
        return await self._unary(context, list_jobs, request)

    async def CancelJob(self, request, context):
        async def cancel(request, tenant):
            record = self.job_record(tenant, request.name)
            if record.live and record.final is None:
                await self.bridge.call(lambda e: e.cancel_job(record.internal))
            return await self._job_message(record)
        return await self._unary(context, cancel, request)

    async def WatchJob(self, request, context):
        try:
            tenant = self._tenant(context)
            record = self.job_record(tenant, request.name)
            interval = request.interval_s or 0.5
            if not math.isfinite(interval) or interval < 0:
                raise ValueError(f"interval_s must be a finite number >= 0, got {interval!r}")
            interval = min(max(interval, 0.05), 60.0)
            last = None
            while True:
                job = await self._job_message(record)
                key = (job.state, job.step, job.tokens_trained)
                if key != last:
                    last = key
                    yield job
                if job.state in (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_CANCELLED,
                                 pb.JOB_STATE_FAILED):
                    return
                await asyncio.sleep(interval)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code, message = classify(e)
            await context.abort(code, message)

    def tick(self, engine: ServingEngine) -> None:
        """Engine thread, every tick: job metrics, and noticing jobs that ended."""
        snapshots = []
        for internal in self._live:
            try:
                snapshots.append((internal, convert.progress_dict(engine.job_progress(internal))))
            except Exception:
                log.exception("progress of job %s", internal)
        if self._loop is not None:  # also when empty: the running-jobs gauge drops to 0
            self._loop.call_soon_threadsafe(self._on_progress, snapshots)

    def _on_progress(self, snapshots: list[tuple[str, dict]]) -> None:
        running = 0
        for internal, progress in snapshots:
            record = self.jobs.get(internal)
            if record is None or record.final is not None:
                continue
            labels = (record.tenant, record.name)
            self.metrics.job_step.labels(*labels).set(progress["step"])
            self.metrics.job_tokens_per_s.labels(*labels).set(progress["tokens_per_s"])
            if progress["loss"] is not None:
                self.metrics.job_loss.labels(*labels).set(progress["loss"])
            if progress["state"] in convert.TERMINAL_STATES:
                self._finalize(record, progress)
            else:
                running += 1
        self.metrics.jobs_running.set(running)

    async def resume_jobs(self) -> None:
        """Startup: resubmits the persisted jobs that had not finished (they resume from
        their checkpoints) and remembers the finished ones."""
        base = self.roots.state_dir and os.path.join(self.roots.state_dir, "jobs")
        if not base or not os.path.isdir(base):
            return
        for internal in sorted(os.listdir(base)):
            directory = os.path.join(base, internal)
            try:
                with open(os.path.join(directory, META_FILE)) as f:
                    meta = json.load(f)
                with open(os.path.join(directory, SPEC_FILE), "rb") as f:
                    request = pb.SubmitFinetuneRequest.FromString(f.read())
            except (OSError, ValueError) as e:
                log.warning("skipping job state in %s: %s", directory, e)
                continue
            tenant, name = meta["tenant"], meta["name"]
            final_path = os.path.join(directory, FINAL_FILE)
            if os.path.isfile(final_path):
                with open(final_path) as f:
                    final = json.load(f)
                lora = convert.lora_config(request.lora, 1 << 30)
                self.jobs[internal] = JobRecord(
                    tenant=tenant, name=name, internal=internal, lora=lora,
                    num_samples=meta.get("num_samples", 0), live=False, final=final,
                    directory=directory)
                continue
            try:
                record = await self._start_job(request, tenant, internal)
                log.info("resumed job %s of tenant %s at step %d", name, tenant,
                         record.resumed_from_step)
            except Exception as e:
                log.error("could not resume job %s of tenant %s: %s", name, tenant, e)
                failed = {"name": internal, "state": "failed", "step": 0, "total_steps": 0,
                          "loss": None, "first_loss": None, "learning_rate": None,
                          "grad_norm": None, "tokens_trained": 0, "tokens_per_s": 0.0,
                          "epoch": 0, "error": f"could not resume after a restart: {e}"}
                record = JobRecord(tenant=tenant, name=name, internal=internal,
                                   lora=LoraConfig(), num_samples=0, live=False,
                                   directory=directory)
                self.jobs[internal] = record
                self._finalize(record, failed)

    async def checkpoint_running_jobs(self) -> list[tuple[str, int | None]]:
        """Drain: saves every running job now, so a restart loses no finished step."""
        names = sorted(self._live)

        def save(engine: ServingEngine):
            done = []
            for internal in names:
                try:
                    done.append((internal, checkpoint_job(engine, internal)))
                except Exception:
                    log.exception("checkpointing job %s", internal)
            return done

        return await self.bridge.call(save)

    # ----- adapters -------------------------------------------------------------------------

    async def LoadAdapter(self, request, context):
        return await self._unary(context, self.load_adapter, request)

    async def load_adapter(self, request: pb.LoadAdapterRequest, tenant: str) -> pb.Adapter:
        """Loads an adapter directory under the adapter root as the tenant's adapter
        ``request.name`` (by default the directory's name); ``request.replace`` replaces
        one of that name."""
        from coserve_jax.lora.peft_io import load_adapter

        path = resolve_under(self.roots.adapter_root, request.path, "path", "adapter root")
        name = request.name or os.path.basename(os.path.normpath(request.path))
        internal = internal_name(tenant, name, "name")
        if internal in self.jobs or internal in self._reserved:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                               f"name: {name!r} is the name of a finetuning job")
        if internal in self._loaded and not request.replace:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                               f"name: an adapter named {name!r} is already loaded "
                               "(set replace to replace it)")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: no adapter directory {request.path!r} under the "
                                    "adapter root")
        check_files_within(self.roots.adapter_root, path, ADAPTER_FILES, "path")
        try:
            adapter = await asyncio.to_thread(load_adapter, self.backend.model_config, path,
                                              internal, self.backend.max_lora_rank)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"path: {e}".replace(path, request.path)) from None
        except ValueError as e:
            raise ValueError(f"path: {e}".replace(path, request.path)) from None
        await self.bridge.call(lambda e: e.load_adapter(adapter, replace=request.replace))
        self._loaded[internal] = (adapter, request.path)
        return convert.adapter_message(name, pb.ADAPTER_KIND_LOADED, adapter.config,
                                       request.path)

    async def UnloadAdapter(self, request, context):
        async def unload(request, tenant):
            await self.unload_adapter(tenant, request.name)
            return pb.UnloadAdapterResponse()
        return await self._unary(context, unload, request)

    async def unload_adapter(self, tenant: str, name: str, field: str = "name") -> None:
        """Unloads the tenant's loaded adapter ``name``: FAILED_PRECONDITION for a
        finetuning job's, KeyError (NOT_FOUND) for none; ``field`` names the request field
        in messages."""
        internal = internal_name(tenant, name, field)
        if internal in self.jobs:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{field}: {name!r} is the adapter of a finetuning job")
        if internal not in self._loaded:
            raise KeyError(f"{field}: no adapter named {name!r}")
        await self.bridge.call(lambda e: e.unload_adapter(internal))
        del self._loaded[internal]

    async def adapters_of(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's adapters the engine holds (loaded ones and jobs'), by name."""
        names = await self.bridge.call(lambda e: e.adapters())
        out = []
        for internal in names:
            name = public_name(tenant, internal)
            if name is None:
                continue
            if internal in self._loaded:
                adapter, path = self._loaded[internal]
                out.append(AdapterInfo(name, "loaded", adapter.config, path))
            elif internal in self.jobs:
                out.append(AdapterInfo(name, "job", self.jobs[internal].lora))
        return sorted(out, key=lambda a: a.name)

    async def ListAdapters(self, request, context):
        async def list_adapters(request, tenant):
            kinds = {"loaded": pb.ADAPTER_KIND_LOADED, "job": pb.ADAPTER_KIND_FINETUNE}
            return pb.ListAdaptersResponse(adapters=[
                convert.adapter_message(a.name, kinds[a.kind], a.lora, a.path or "")
                for a in await self.adapters_of(tenant)])
        return await self._unary(context, list_adapters, request)

    async def ExportAdapter(self, request, context):
        return await self._unary(context, self._export_adapter, request)

    async def _export_adapter(self, request, tenant: str) -> pb.ExportAdapterResponse:
        from coserve_jax.lora.peft_io import load_adapter, save_adapter

        internal = internal_name(tenant, request.name, "name")
        path = resolve_under(self.roots.adapter_root, request.path, "path", "adapter root")
        if internal in self._loaded:
            adapter = self._loaded[internal][0]
        elif internal in self.jobs and self.jobs[internal].tenant == tenant:
            record = self.jobs[internal]
            if record.live:
                adapter = await self.bridge.call(lambda e: e.trained_adapter(internal))
            else:  # finished before a restart: its final adapter is in the state dir
                saved = os.path.join(record.directory or "", "adapter")
                if not os.path.isdir(saved):
                    raise KeyError(f"name: job {request.name!r} left no adapter")
                adapter = await asyncio.to_thread(load_adapter, self.backend.model_config,
                                                  saved, internal)
        else:
            raise KeyError(f"name: no adapter or job named {request.name!r}")
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)) \
                and not request.overwrite:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                               f"path: {request.path!r} exists (set overwrite to replace it)")
        adapter = dataclasses.replace(adapter, name=request.name,
                                      base_model_name_or_path=self.backend.model_name)
        try:
            await asyncio.to_thread(save_adapter, adapter, path)
        except FileExistsError as e:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"path: {e}".replace(path, request.path)) from None
        return pb.ExportAdapterResponse(path=request.path)

    # ----- profiling ------------------------------------------------------------------------

    async def Profile(self, request, context):
        return await self._unary(context, self._profile, request)

    async def _profile(self, request, tenant: str) -> pb.ProfileResponse:
        if request.steps <= 0:
            raise ValueError(f"steps must be positive, got {request.steps}")
        if self.roots.profile_root:
            os.makedirs(self.roots.profile_root, exist_ok=True)
        path = resolve_under(self.roots.profile_root, request.dir, "dir", "profile root")
        steps = request.steps

        # A trace already being captured raises InUse: FAILED_PRECONDITION.
        await self.bridge.call(lambda engine: engine.start_profile(path, steps))
        log.info("profiling %d steps into %s (tenant %s)", steps, path, tenant)
        return pb.ProfileResponse(dir=request.dir)

