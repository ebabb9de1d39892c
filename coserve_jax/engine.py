"""The engine: one model, one KV cache and one jitted co-serving step, driven one
iteration at a time.

Each ``step()`` is one iteration in three stages (see ``coserve_jax.scheduler``):
the ``Scheduler`` plans it on the host (inference first, then the finetuning share the
policy gives it), the ``Runner`` runs it on the device (the step, then backward
pieces), and the scheduler applies the sampled tokens, matched by request id. With
``EngineConfig.overlap_host`` the next iteration is planned and dispatched before the
current one's tokens are read back, so the host's work hides behind the device's.

The engine itself validates requests, owns the adapter and job API, compiles and
measures (``warmup``), and keeps the counters and telemetry. It is single-threaded:
callers (the gRPC server, ``generate``) own the loop and call
``add_request``/``abort``/``step`` from one thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from coserve_jax.batch import Bucket, TokenBatch, build_batch, loss_row_sizes, pick_bucket
from coserve_jax.engine_config import EngineConfig, derive_lengths, derive_trainer_config
from coserve_jax.errors import AdmissionError, AlreadyExists, InUse, InvalidRequest, NotFound
from coserve_jax.finetune.buffers import TrainBuffers
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.finetune.trainer import Trainer, TrainerConfig
from coserve_jax.kv_cache import KVCache, KVUsage, PageAllocator
from coserve_jax.latency import (
    LATENCY_MODEL_VERSION,
    LatencyModel,
    bucket_key,
    loss_head_key,
    model_file,
    piece_key,
    sample_key,
    sample_part_key,
    vocab_sort_key,
)
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.slots import AdapterRegistry, AdapterSlots, slot_modules
from coserve_jax.model import Model
from coserve_jax.policy import TEMPORAL_KINDS, Policy
from coserve_jax.programs import check_compiler_options, enable_compilation_cache
from coserve_jax.runner import Runner
from coserve_jax.runner_commands import RunStep
from coserve_jax.sampling import MAX_SEED, SamplingParams
from coserve_jax.scheduler import IterationPlan, Request, RequestOutput, Scheduler
from coserve_jax.slo import SLO, RequestMetrics
from coserve_jax.step import STEP_PROGRAM_VERSION, StepOutput, step_kernels
from coserve_jax.telemetry import Profiler, ScalarWriter, backward_label, forward_label
from coserve_jax.tiny_model import cache_root
from pallas_kernels.dispatch import KernelOptions
from sharding.layout import Layout

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "Request", "RequestOutput", "StepInfo"]


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the last iteration carried."""

    inference_tokens: int
    finetune_tokens: int
    backward_pieces: int
    finetune_iteration: bool
    bucket: Bucket | None
    seconds: float
    whole_samples: int = 0
    """Samples run whole (forward and full backward in one program: temporal-seq); 0 in an
    iteration running a part of a sample run in parts."""


@dataclasses.dataclass
class _Launched:
    """An iteration dispatched to the device whose sampled tokens the host has not read."""

    plan: IterationPlan
    out: StepOutput
    dispatched: float
    """``perf_counter`` when the step was dispatched."""
    pieces_before: tuple[str, ...]
    """Latency-model keys of the backward pieces queued on the device between the previous
    step and this one (they run before it)."""


class Engine:
    """Continuous-batching inference and token-level finetuning over one model."""

    def __init__(self, model: Model, config: EngineConfig | None = None, mesh=None):
        self.model = model
        self.config = config = config or EngineConfig()
        mc = model.config
        # A ``jax.sharding.Mesh`` (sharding.make_mesh) serves sharded: weights, KV pages,
        # adapter slots and finetuning state each get their layout (sharding/layout.py).
        # Without one the layout is a mesh of one device: the same code path.
        self.layout = Layout.single(mc) if mesh is None else Layout(mesh, mc)
        if self.layout.sharded:
            self.model = model = self.layout.place_model(model)
        # Lengths and bucket axes, as `coserve plan` derives them (engine_config.py).
        self.lengths = lengths = derive_lengths(mc, config)
        self.max_model_len = lengths.max_model_len
        self.max_pages_per_seq = lengths.max_pages_per_seq
        cache, adapters, ft = config.cache, config.adapters, config.finetune
        enable_compilation_cache(config.kernels.compilation_cache_dir)
        # Resolved once, here: the step and the backward pieces share it.
        self.kernels = step_kernels(config.kernels.impl, self.layout, KernelOptions(
            dense_lora=config.kernels.dense_lora,
            skip_unused_lora=config.kernels.skip_unused_lora,
            unroll_layers=config.kernels.unroll_layers,
            xla_compiler_options=check_compiler_options(config.kernels.compiler_options())))
        self.allocator = PageAllocator(cache.num_pages, cache.page_size, self.max_pages_per_seq)
        trainer_config = derive_trainer_config(config, lengths.max_train_len)
        modules = slot_modules(adapters.lora_target_modules)
        slots = train = None
        if adapters.max_adapters:
            slots = self.layout.zeros(AdapterSlots.zeros, mc, adapters.max_adapters,
                                      adapters.max_lora_rank, modules, model.dtype)
        if trainer_config is not None:
            train = self._train_buffers(trainer_config, slots)
        self.runner = Runner(
            mc, model.params, kv=self.layout.zeros(KVCache.zeros, mc, cache.num_pages,
                                                   cache.page_size, model.dtype),
            feed_size=config.buckets.max_num_seqs, slots=slots, train=train,
            kernels=self.kernels, attention_block=ft.backward_attention_block,
            layout=self.layout)
        self.registry = None
        if adapters.max_adapters:
            self.registry = AdapterRegistry(mc, adapters.max_adapters, adapters.max_lora_rank,
                                            modules, self.runner.execute)
        self.trainer = None
        if trainer_config is not None:
            self.trainer = Trainer(mc, self.registry, self.allocator, trainer_config,
                                   self.runner)
        self.buckets = tuple(sorted(
            (Bucket(t, s, w, train)
             for t in lengths.token_buckets for s in lengths.seq_buckets
             for w in lengths.page_buckets
             for train in ((False, True) if self.trainer else (False,))
             if s <= t),
            key=lambda b: (b.num_tokens, b.num_pages, b.num_seqs)))
        self.layout.check_divides_tokens(lengths.token_buckets, "token buckets")
        sched = config.scheduling
        self.policy = Policy(sched.mode, safety=sched.safety,
                             spend_banked=sched.spend_banked_slack,
                             banked_reserve=sched.banked_reserve,
                             slot_headroom=sched.slot_headroom,
                             credit_cap=sched.sample_credit_cap)
        if self.policy.whole_samples and self.layout.sharded:
            raise ValueError(f"mode {sched.mode} runs whole samples on one device; use "
                             f"coserve or temporal:N on a mesh")
        # Idle coserve iterations may run whole samples, and so may the whole-sample unit
        # (one device, and a trainer).
        samples_ok = (self.policy.kind == "coserve" and self.trainer is not None
                      and not self.layout.sharded)
        idle_samples = sched.idle_whole_samples and samples_ok
        if sched.finetune_unit == "samples" and not samples_ok:
            raise ValueError("finetune_unit='samples' runs whole samples on one device beside "
                             "coserve inference; use 'tokens' (or 'auto') here")
        self._choose_unit = sched.finetune_unit == "auto" and samples_ok
        self._default_tpot_s = sched.default_tpot_s
        # Keyed by what sets step times: hardware, model and the engine's shapes (the
        # shape-related parts of the config, never scheduling or telemetry), the resolved
        # kernels (not the requested "auto") and the step program's version.
        shapes = (config.cache, config.buckets, config.adapters, config.finetune)
        self.latency_path = model_file(config.telemetry.latency_model_dir or cache_root(),
                                       jax.devices()[0].device_kind, jax.__version__, mc, shapes,
                                       self.kernels, STEP_PROGRAM_VERSION,
                                       LATENCY_MODEL_VERSION)
        latency = LatencyModel.load(self.latency_path) or LatencyModel()
        self.scheduler = Scheduler(
            buckets=self.buckets, page_size=cache.page_size,
            max_num_seqs=config.buckets.max_num_seqs,
            max_num_batched_tokens=config.buckets.max_num_batched_tokens,
            max_pages_per_seq=self.max_pages_per_seq, max_waiting=sched.max_waiting,
            admission_control=sched.admission_control, allocator=self.allocator,
            latency=latency, policy=self.policy, eos_token_ids=mc.eos_token_ids,
            registry=self.registry, trainer=self.trainer, idle_whole_samples=idle_samples,
            slo_prefill_chunks=sched.slo_prefill_chunks, arrival_ttft_s=sched.default_ttft_s,
            cheapest_bucket=sched.cheapest_bucket,
            finetune_unit="samples" if sched.finetune_unit == "samples" and samples_ok
            else "tokens")
        # A dynamic temporal period is set from each iteration's own time: synchronous.
        self.overlap = sched.overlap_host and not (self.policy.kind in TEMPORAL_KINDS
                                                   and self.policy.period is None)
        self._launched: _Launched | None = None
        # A whole sample planned right after a step that sampled tokens: those tokens go out
        # first (the call returns them) and the sample runs at the next call, so no client
        # waits a whole sample for tokens already computed. (plan, when its iteration began)
        self._deferred_sample: tuple[IterationPlan, float] | None = None
        self._device_free: float | None = None  # when the last collected step ended, if known
        self._pieces_queued: list[str] = []  # keys of pieces dispatched since the last step
        self._queued_s = 0.0  # predicted seconds of the last iteration's device work
        # Latency keys whose shape has run in this process (on this engine or an earlier
        # one sharing its programs): a shape's first run includes its compilation.
        self._compiled = self.runner.shapes_run
        self._seed_rng = random.Random()
        self.num_steps = 0
        # Totals since start: steps, inference_tokens, train_tokens, mixed_steps (inference
        # and finetuning tokens in one batch), backward_pieces; inference_steps (steps serving
        # requests), inference_rows (their batch rows), inference_alone_s (their inference's
        # predicted seconds as a step of its own); whole_samples, sample_parts (iterations
        # running a part of a sample run in parts), sample_tokens (the tokens of both).
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_step: StepInfo | None = None
        self.profiler = Profiler()
        run_dir = config.telemetry.run_dir
        self.writer = ScalarWriter(run_dir) if run_dir else None
        if self.trainer is not None:
            self.trainer.writer = self.writer
        self._logged = {"finished": 0, "counters": collections.Counter()}

    def _train_buffers(self, tc: TrainerConfig, slots) -> TrainBuffers:
        if tc.block and self.layout.sharded:
            raise ValueError("token-block backward pieces (FinetuneConfig.backward_block) "
                             "run on one device; use backward_block=0 on a mesh")
        self.layout.check_divides_tokens(self.lengths.train_seq_buckets,
                                          "backward sequence buckets")
        # One partial gradient sum per data shard (see TrainBuffers).
        return self.layout.zeros(TrainBuffers.zeros, self.model.config, slots, tc.max_seqs,
                                 tc.max_len, self.model.dtype, groups=self.layout.data_size,
                                 blocks=tc.block > 0, keep_projections=tc.keep_projections)

    # ----- what the scheduler holds ---------------------------------------------------------

    @property
    def latency(self) -> LatencyModel:
        """Predicted step and piece times (measured by ``warmup``, updated as steps run)."""
        return self.scheduler.latency

    @latency.setter
    def latency(self, model: LatencyModel) -> None:
        self.scheduler.latency = model

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def finished(self) -> collections.deque[RequestMetrics]:
        """Metrics of recently finished requests, newest last."""
        return self.scheduler.finished

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ----- requests -------------------------------------------------------------------------

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    slo: SLO | None = None, arrival_time: float | None = None,
                    admission: bool = True) -> str:
        """Queues a request after validating it; raises ``ValueError`` on bad input and
        ``AdmissionError`` (a ``ValueError``) when it is refused at admission.

        Nothing reaches the device here, so a bad request never disturbs others.
        ``arrival_time`` (``time.monotonic()`` clock) is when the client sent it;
        TTFT counts from there. ``admission=False`` skips admission control (offline
        batches that must all run, like ``generate``).
        """
        if not self.policy.serves_inference:
            raise AdmissionError(f"engine mode {self.config.scheduling.mode} serves no inference")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams")
        prompt = self.model.check_tokens(prompt, "prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt)} tokens) plus max_tokens "
                             f"({params.max_tokens}) is {total}, beyond the model length "
                             f"{self.max_model_len}")
        for t in params.stop_token_ids:
            if t >= self.model.config.vocab_size:
                raise InvalidRequest(f"stop token id {t} is outside the vocabulary")
        self.allocator.check_fits(total - 1)  # the last sampled token needs no K/V
        if adapter is not None and (self.registry is None
                                    or adapter not in self.registry.names()):
            raise InvalidRequest(f"unknown adapter {adapter!r}")
        if request_id is not None and str(request_id) in self.scheduler.requests:
            raise AlreadyExists(f"request id {request_id!r} is already in use")
        slo = slo or SLO(self.config.scheduling.default_ttft_s,
                         self.config.scheduling.default_tpot_s)
        if admission:
            self.scheduler.admit(len(prompt), slo, sorts_vocab=params.temperature > 0)
        index = next(self.scheduler.arrivals)
        request_id = str(index) if request_id is None else str(request_id)
        seed = params.seed if params.seed is not None else self._seed_rng.randint(0, MAX_SEED)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, prompt, params, seed, index, arrival, adapter=adapter, slo=slo)
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is and frees its pages; False if it is unknown."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """Inference requests or finetuning jobs still have work."""
        return (self.scheduler.has_requests() or self._launched is not None
                or self._deferred_sample is not None
                or (self.trainer is not None and self.trainer.has_work()))

    # ----- adapters and jobs ----------------------------------------------------------------

    def load_adapter(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Writes an adapter into a slot; requests can name it at once. Never recompiles."""
        if self.registry is None:
            raise InvalidRequest("this engine has no adapter slots (EngineConfig.max_adapters=0)")
        if self.trainer is not None and adapter.name in self.trainer.jobs:
            raise InUse(f"{adapter.name!r} is the adapter of a finetuning job")
        self.registry.load(adapter, replace=replace)

    def unload_adapter(self, name: str) -> None:
        if self.registry is None or name not in self.registry.names():
            raise NotFound(f"no adapter named {name!r}")
        if self.trainer is not None and name in self.trainer.jobs:
            raise InUse(f"{name!r} is the adapter of a finetuning job")
        users = [r.request_id for r in [*self.running, *self.waiting] if r.adapter == name]
        if users:
            raise InUse(f"adapter {name!r} is in use by {len(users)} request(s)")
        self.registry.unload(name)

    def adapters(self) -> list[str]:
        return [] if self.registry is None else self.registry.names()

    def submit_job(self, job: FinetuneJob) -> JobProgress:
        """Starts (or resumes from its checkpoint) a finetuning job; raises ValueError."""
        if self.trainer is None:
            raise InvalidRequest("this engine does not finetune (EngineConfig.max_train_seqs=0)")
        return self.trainer.submit(job)

    def job_progress(self, name: str) -> JobProgress:
        if self.trainer is None or name not in self.trainer.jobs:
            raise NotFound(f"no job named {name!r}")
        return self.trainer.jobs[name].progress()

    def cancel_job(self, name: str) -> None:
        if self.trainer is None or name not in self.trainer.jobs:
            raise NotFound(f"no job named {name!r}")
        self.trainer.cancel(name)

    def checkpoint_job(self, name: str) -> int | None:
        """Checkpoints a running job now; the step saved, or None if it has no checkpoint
        directory or is not running."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise NotFound(f"no job named {name!r}")
        return self.trainer.checkpoint(name)

    def remove_job(self, name: str) -> None:
        """Forgets a completed, cancelled or failed job and frees its adapter slot."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise NotFound(f"no job named {name!r}")
        self.trainer.remove(name)

    def trained_adapter(self, name: str) -> LoraAdapter:
        """A job's adapter with the weights of its latest optimizer step."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise NotFound(f"no job named {name!r}")
        return self.trainer.adapter_of(self.trainer.jobs[name])

    def kv_usage(self) -> KVUsage:
        return self.allocator.usage()

    # ----- the iteration --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns the outputs of every request that advanced.

        Inference is scheduled first; the policy then sizes the finetuning forward
        windows and backward pieces the iteration can carry (see ``scheduler``). An
        iteration that runs a whole sample returns no tokens: when the step before it
        sampled some, this call hands them out and the next one runs the sample.
        """
        with self.profiler.step(self.counters["iterations"]):
            outputs = self._iteration()
        self.counters["iterations"] += 1
        every = self.config.telemetry.log_every
        if self.writer is not None and self.counters["iterations"] % every == 0:
            self._log_serving()
        return outputs

    def close(self) -> None:
        """Finishes a trace in progress and writes out the TensorBoard event files (with the
        serving scalars of the iterations since the last ``log_every``)."""
        self.profiler.stop()
        if self.writer is not None:
            if self.counters["iterations"] > self._logged["counters"]["iterations"]:
                self._log_serving()
            if self.trainer is not None:
                self.trainer.write_scalars(wait=True)
            self.writer.close()

    def start_profile(self, log_dir: str, num_steps: int) -> None:
        """Captures a ``jax.profiler`` trace of the next ``num_steps`` iterations into
        ``log_dir`` (open it with TensorBoard's profile plugin)."""
        self.profiler.start(log_dir, num_steps)

    def _log_serving(self) -> None:
        """Serving scalars over the iterations since the last call."""
        finished = list(self.finished)[self._logged["finished"]:]
        delta = self.counters - self._logged["counters"]
        self._logged = {"finished": len(self.finished), "counters": self.counters.copy()}
        tokens = delta["inference_tokens"] + delta["train_tokens"]
        values = {
            "finetune_share": delta["train_tokens"] / tokens if tokens else 0.0,
            "iteration_s": delta["iteration_s"] / max(delta["iterations"], 1),
            "kv_pages_used": float(self.allocator.usage().used_pages),
        }
        if finished:
            values |= {
                "slo_attainment": float(np.mean([m.slo_attained for m in finished])),
                "ttft_s": float(np.median([m.ttft_s for m in finished])),
                "tpot_s": float(np.median([m.tpot_s for m in finished])),
            }
        self.writer.scalars("serving", values, self.counters["iterations"])
        if self.trainer is not None:
            self.trainer.write_scalars()
        self.writer.flush()

    def _iteration(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        if self._deferred_sample is not None:
            plan, began = self._deferred_sample
            self._deferred_sample = None
            if self.trainer.has_sample_work():  # (unless its job ended in between)
                return self._whole_sample_iteration(plan, began)
        plan = self.scheduler.schedule(self._queued_s)
        self._queued_s = 0.0
        self.counters["finetune_yields"] = self.scheduler.finetune_yields
        self.counters["slot_waits"] = self.scheduler.slot_waits
        if plan.whole_sample:
            outputs, _ = self._collect_launched()
            if outputs:
                self._deferred_sample = (plan, t_start)
                # This call ran nothing of its own: it only handed out the tokens.
                self.last_step = StepInfo(0, 0, 0, False, None,
                                          time.perf_counter() - t_start)
                return outputs
            return self._whole_sample_iteration(plan, t_start)
        t_planned = time.perf_counter()
        launched = None
        if plan.batch is not None:
            launched = self._launch(plan)
        if self.overlap and launched is not None:
            # Pieces go right behind the step, priced by the latency model; the previous
            # iteration's tokens are read while this one runs.
            step_s = self.scheduler.predicted_step_seconds(plan)
            pieces = self._run_backward(plan, step_s, timed=False)
            self._pieces_queued += pieces
            # Predicted device work the next plan's tokens will wait behind.
            self._queued_s = step_s + sum(self.latency.predict(k) for k in pieces)
            outputs, _ = self._collect_launched()
            self._launched = launched
        else:
            # Without a step of its own (overlapped or not), an iteration runs its pieces
            # timed, after the work queued before it: nothing would wait for pieces with
            # no step behind them, so a run of such iterations would pile them up on the
            # device, and a request arriving next would wait for all of it (measured on the
            # small tier, 2026-12-05: 2.1-2.3 s of pieces queued after idle iterations).
            step_s = 0.0
            if launched is not None:
                self._launched = launched
                outputs, step_s = self._collect_launched()
            else:
                outputs, _ = self._collect_launched()  # (the overlapped loop's last step)
                self._drain_pieces()
            pieces = self._run_backward(plan, step_s, timed=True)
        total = time.perf_counter() - t_start
        self.policy.observe(total, had_inference=bool(plan.rows),
                            had_finetune=bool(plan.windows or pieces),
                            tpot_target=plan.tpot_target, headroom_s=plan.slot_headroom_s)
        # Host time: planning and packing before the dispatch (with overlap, reading back
        # and applying the previous iteration's tokens is hidden behind this one's step).
        self.counters.update(host_s=t_planned - t_start, iteration_s=total)
        self.last_step = StepInfo(plan.inference_tokens, plan.finetune_tokens, len(pieces),
                                  plan.finetune_iteration, plan.bucket, total)
        return outputs

    def _launch(self, plan: IterationPlan) -> _Launched:
        """Dispatches the plan's step (the device runs it while the host goes on)."""
        label = forward_label(plan.bucket, plan.decode_rows,
                              plan.inference_tokens - plan.decode_rows, plan.finetune_tokens)
        t0 = time.perf_counter()
        with jax.profiler.TraceAnnotation(label):
            out = self.runner.execute(RunStep(plan.batch, plan.bucket.train))
        if plan.windows:
            self.trainer.attach_losses(list(plan.windows), out.seq_loss, len(plan.rows))
        self.num_steps += 1
        self.counters.update(steps=1, inference_tokens=plan.inference_tokens,
                             train_tokens=plan.finetune_tokens,
                             mixed_steps=int(bool(plan.rows and plan.windows)),
                             inference_steps=int(bool(plan.rows)), inference_rows=len(plan.rows),
                             inference_alone_s=plan.inference_s)
        pieces_before, self._pieces_queued = tuple(self._pieces_queued), []
        return _Launched(plan, out, t0, pieces_before)

    def _collect_launched(self) -> tuple[list[RequestOutput], float]:
        """Reads back the launched iteration's sampled tokens (waiting for its step) and
        applies them; times the step for the latency model where the time is known.
        Returns the outputs and the seconds from the step's dispatch to its tokens."""
        launched, self._launched = self._launched, None
        if launched is None:
            return [], 0.0
        out, plan = launched.out, launched.plan
        was_running = not out.next_tokens.is_ready()
        next_tokens = np.asarray(out.next_tokens)
        t_ready = time.perf_counter()
        # Logprobs cross to the host only in iterations where someone asked.
        logprobs = None
        if any(r.request.params.logprobs is not None for r in plan.rows):
            logprobs = (np.asarray(out.sampled_logprobs), np.asarray(out.top_logprobs),
                        np.asarray(out.top_token_ids))
        if not self.overlap:  # the device was idle at the dispatch
            self._observe_step(plan, t_ready - launched.dispatched)
        elif was_running and self._device_free is not None:
            self._observe_overlapped(launched, t_ready)
        # The step's end is known only if the host was waiting for it.
        self._device_free = t_ready if was_running else None
        return (self.scheduler.update(plan, next_tokens, logprobs),
                t_ready - launched.dispatched)

    def _observe_overlapped(self, launched: _Launched, t_ready: float) -> None:
        """Times the device work that ran between the previous step's end
        (``_device_free``) and this step's (``t_ready``), both seen by a waiting host.

        Without pieces before it, that is the step from when it could start (dispatched,
        and the device free). With pieces before it, the device ran them and then the step
        without a gap if the step was queued before the previous one ended; what the span
        holds beyond the step's prediction is the pieces' time (and anything they ran,
        such as an optimizer update), shared among them in proportion to their
        predictions. This is how pieces, never waited for in the overlapped loop, are
        timed at all: a latency model measured on a quieter machine would otherwise keep
        pricing them too low (or too high) for as long as the engine runs.
        """
        plan = launched.plan
        key = bucket_key(plan.bucket)
        before = launched.pieces_before
        if not before:
            self._observe_step(plan, t_ready - max(launched.dispatched, self._device_free))
            return
        if launched.dispatched > self._device_free:
            return  # the device may have been idle between the pieces and the step
        if key not in self._compiled:  # the span holds the step's compilation
            self._compiled.add(key)
            return
        predicted = [self.latency.predict(k) for k in before]
        total = sum(predicted)
        pieces_s = t_ready - self._device_free - self.scheduler.predicted_step_seconds(plan)
        if pieces_s <= 0 or not total:
            return
        for k, p in zip(before, predicted, strict=True):
            self._observe(k, pieces_s * p / total)

    def _whole_sample_iteration(self, plan: IterationPlan,
                                t_start: float) -> list[RequestOutput]:
        """One whole sample, forward and backward, as a standard trainer runs it, and no
        inference tokens: a temporal-seq finetuning iteration, an idle coserve one, or one of
        coserve's whole-sample unit; or one part of a sample run in parts (``plan.sample_part``).
        Its time feeds the latency model and the policy."""
        trainer = self.trainer
        if plan.sample_part:
            bucket, index = trainer.next_sample_part()
            key = sample_part_key(bucket, index, trainer.sample_parts)
        else:
            key = sample_key(trainer.next_sample_bucket())
        self._drain_pieces()  # (or the sample would be timed with them)
        with jax.profiler.TraceAnnotation("sample_part" if plan.sample_part else "whole_sample"):
            t0 = time.perf_counter()
            if plan.sample_part:
                tokens, ran = trainer.run_sample_part(), True
            else:
                tokens = ran = trainer.run_whole_sample()
            jax.block_until_ready((self.runner.train.grad_a, self.runner.sample_part_h))
        if ran:
            self._observe(key, time.perf_counter() - t0)
        total = time.perf_counter() - t_start
        self.policy.observe(total, had_inference=False, had_finetune=True,
                            tpot_target=plan.tpot_target)
        whole = int(not plan.sample_part)
        self.counters.update(train_tokens=tokens, sample_tokens=tokens, whole_samples=whole,
                             sample_parts=1 - whole, iteration_s=total)
        self.last_step = StepInfo(0, tokens, 0, True, None, total, whole_samples=whole)
        return []

    def _drain_pieces(self) -> None:
        """Waits for the backward pieces the overlapped loop queued behind its last step
        (it never waits for them itself; the next step would run behind them)."""
        if self._pieces_queued:
            jax.block_until_ready(self.runner.train.grads_h)
            self._pieces_queued = []
            self._device_free = time.perf_counter()

    def _run_backward(self, plan: IterationPlan, step_seconds: float,
                      timed: bool) -> list[str]:
        """Runs up to ``backward_pieces_per_step`` backward pieces while the latency model
        says the next one fits in what the policy leaves after a step of ``step_seconds``;
        ``timed``: waits for each and times it for the latency model. Returns the pieces'
        latency-model keys."""
        if self.trainer is None:
            return []
        seconds = self.scheduler.backward_seconds(plan, step_seconds)
        done, spent = [], 0.0
        while len(done) < self.config.finetune.backward_pieces_per_step:
            def fits(shape, spent=spent):
                return spent + self.latency.predict(piece_key(*shape)) <= seconds

            shape = self.trainer.next_piece_shape(fits)
            if shape is None:
                break
            t0 = time.perf_counter()
            with jax.profiler.TraceAnnotation(backward_label(*shape)):
                self.trainer.run_backward_piece(fits)
                if timed:
                    jax.block_until_ready(self.runner.train.grads_h)
            if timed:
                seconds_taken = time.perf_counter() - t0
                self._observe(piece_key(*shape), seconds_taken)
                spent += seconds_taken
            else:
                spent += self.latency.predict(piece_key(*shape))
            done.append(piece_key(*shape))
        self.counters["backward_pieces"] += len(done)
        return done

    def _observe_step(self, plan: IterationPlan, seconds: float) -> None:
        """Times a step for its bucket, whose entry is an all-greedy step's time with no
        loss rows: less the predicted time of the sort where the step sorted the vocabulary
        and of the loss head where it carried finetuning tokens."""
        extra = (self.latency.sort_seconds(plan.bucket, plan.sorts_vocab)
                 + self.latency.loss_seconds(plan.bucket, plan.loss_rows))
        self._observe(bucket_key(plan.bucket), seconds - extra)

    def _observe(self, key: str, seconds: float) -> None:
        """Feeds an observed time to the latency model, except a shape's first run in this
        process: it includes compilation, and a prediction inflated by it would keep the
        scheduler from ever running (and re-measuring) that shape beside inference."""
        if key in self._compiled:
            self.latency.observe(key, seconds)
        else:
            self._compiled.add(key)

    # ----- compilation ----------------------------------------------------------------------

    def warmup(self, progress: bool = True, measure: bool = True) -> None:
        """Compiles the step for every bucket and measures the latency model. Shapes an
        earlier engine of this process ran on the same programs are compiled already, and
        are skipped unless the latency model is measured.

        The timing batch writes nothing (every KV slot is padding) but takes the
        costly paths, all tokens using adapter slot 0, except two whose cost depends on the
        batch, not the bucket, and which are measured apart: the vocabulary sort (a bucket
        is timed greedy, the common case, which skips it; ``latency.vocab_sort_key`` per
        number of rows) and a training step's loss head (a bucket is timed with no rows
        carrying a loss; ``latency.loss_head_key`` per compiled row count).
        A latency model saved by an earlier run with the same hardware, model and
        config is reused instead of measuring again (whole samples are measured when it
        has none: they run only in some modes).
        """
        samples = self.trainer is not None and (self.policy.whole_samples or self._choose_unit
                                                or self.scheduler.idle_samples)
        measure_samples = samples and measure and any(
            sample_key(n) not in self.latency.times for n in self.trainer.seq_buckets)
        measure_parts = measure  # (of those it lacks)
        measure = measure and not self.latency.times
        for bucket in tqdm(self.buckets, desc="compiling buckets", disable=not progress):
            if not measure and bucket_key(bucket) in self._compiled:
                continue  # compiled by an earlier engine of this process
            self._compiled.add(bucket_key(bucket))
            batch = self._timing_batch(bucket)
            if measure:
                times = self._padding_times(batch, bucket, seconds=0.05, min_repeats=3)
                self.latency.observe(bucket_key(bucket), float(np.median(times)))
            else:
                self._run_padding(batch, bucket)  # compiles it
        if measure:
            self._measure_vocab_sort()
            self._measure_loss_head()
        if samples:
            times = self.trainer.warmup_samples(
                progress, repeats=3 if measure_samples else 1,
                skip=lambda n: not measure_samples and sample_key(n) in self._compiled)
            self._compiled.update(sample_key(n) for n in times)
            for n, seconds in times.items():
                if measure_samples:
                    self.latency.observe(sample_key(n), seconds)
        if (samples and not self.policy.whole_samples and self.trainer.sample_parts > 1
                and self._warmup_sample_parts(progress, measure_parts)):
            measure_samples = True  # (saved below)
        if self.trainer is not None:
            times = self.trainer.warmup(
                progress, repeats=3 if measure else 1,
                skip=lambda shape: not measure and piece_key(*shape) in self._compiled)
            self._compiled.update(piece_key(*shape) for shape in times)
            for shape, seconds in times.items():
                if measure:
                    self.latency.observe(piece_key(*shape), seconds)
        if measure or measure_samples:
            self.latency.save(self.latency_path)
        if self._choose_unit:
            costs = self.scheduler.finetune_costs() or {}
            unit = self.scheduler.choose_finetune_unit(costs)
            log.info("finetune unit: %s (predicted ms per finetuning token: %s)", unit,
                     ", ".join(f"{k} {1e3 * v:.3f}" for k, v in sorted(costs.items())))

    def _warmup_sample_parts(self, progress: bool, measure: bool) -> bool:
        """Compiles the parts of the samples that may run in parts (``Scheduler._sample_unit``:
        those whose whole program is longer than half the default TPOT target, or than a
        request arriving at half the default TTFT target could wait for) and, with
        ``measure``, times those the latency model lacks; returns whether it timed any. An
        unmeasured part never runs: its sample goes whole, or at token level."""
        trainer, count = self.trainer, self.trainer.sample_parts
        arrival_s, tpot_s = self.scheduler.arrival_ttft_s, self._default_tpot_s

        def keys(n: int) -> list[str]:
            return [sample_part_key(n, i, count) for i in range(count)]

        def may_split(whole: float) -> bool:
            return whole > tpot_s / 2 or (bool(arrival_s) and self.policy.sample_too_long(
                whole, 0.0, arrival_s / 2))

        split = [n for n in trainer.seq_buckets
                 if may_split(self.latency.predict(sample_key(n)))]
        measure = measure and any(k not in self.latency.times for n in split for k in keys(n))
        times = trainer.warmup_sample_parts(
            progress, repeats=3 if measure else 1,
            skip=lambda n: n not in split or (not measure and keys(n)[0] in self._compiled))
        for n, seconds in times.items():
            self._compiled.update(keys(n))
            for key, t in zip(keys(n), seconds, strict=True):
                if measure:
                    self.latency.observe(key, t)
        return measure and bool(times)

    def speed_probe(self, seconds: float = 0.25, min_repeats: int = 3) -> float | None:
        """How slow this machine runs now against when the latency model was measured:
        the median, over padding steps of each of two inference buckets (one sequence, and
        a full batch of decodes; ``min_repeats`` of each, and more until ``seconds`` of
        each: a few steps of a millisecond vary by 20%), of observed over predicted seconds
        (1.0: as fast; 1.3: 30% slower). None before ``warmup`` has measured those buckets.

        Call it on a fresh engine, before it serves: the prediction is then the measured or
        saved one, not yet adapted to what the engine observes. A shared machine's speed
        drifts over minutes (2026-12-05: one VM's TPOT p50 under the same load went from 13
        to 16 ms within the hour, its single-request decode TPOT from 5.7 to 7.6 ms within
        three hours), and a benchmark figure from a slowed window says nothing about what it
        compares; benchmarks record this per run."""
        seqs = self.config.buckets.max_num_seqs
        ratios = []
        for bucket in dict.fromkeys(pick_bucket(self.buckets, n, n, 1, False)
                                    for n in (1, seqs)):
            predicted = self.latency.predict(bucket_key(bucket))
            if not predicted:
                continue
            times = self._padding_times(self._timing_batch(bucket), bucket, seconds,
                                        min_repeats)
            ratios += [took / predicted for took in times]
        return float(np.median(ratios)) if ratios else None

    @property
    def finetune_unit(self) -> str:
        """coserve's unit of finetuning beside inference, "tokens" or "samples"
        (``SchedulingConfig.finetune_unit``; "auto" is resolved by ``warmup``)."""
        return self.scheduler.finetune_unit

    def _timing_batch(self, bucket: Bucket, sorts_vocab: bool = False,
                      loss_rows: int = 0) -> TokenBatch:
        batch = build_batch([], bucket, self.config.cache.page_size)
        if self.registry is not None:
            batch = batch.replace(adapter_slots=np.zeros_like(batch.adapter_slots))
        if sorts_vocab:
            batch = batch.replace(temperature=np.ones_like(batch.temperature))
        if loss_rows:
            weights = np.zeros_like(batch.loss_weights)
            weights[:loss_rows] = 1.0 / loss_rows
            batch = batch.replace(loss_weights=weights)
        return batch

    def _measure_loss_head(self) -> None:
        """The loss head's extra seconds per compiled row count (``batch.loss_row_sizes``):
        the smallest training bucket holding that many rows, with them carrying a loss."""
        smallest = {}
        for b in self.buckets:
            if b.train:
                for rows in loss_row_sizes(b.num_tokens)[1:]:
                    smallest.setdefault(rows, b)
        for rows, bucket in smallest.items():
            self.latency.observe(loss_head_key(rows), self._extra_seconds(
                bucket, self._timing_batch(bucket, loss_rows=rows), self._timing_batch(bucket)))

    def _measure_vocab_sort(self) -> None:
        """The vocabulary sort's extra seconds per number of rows: the smallest inference
        bucket of each row count, sampling at temperature 1."""
        smallest = {}
        for b in self.buckets:
            if not b.train:
                smallest.setdefault(b.num_seqs, b)
        for num_seqs, bucket in smallest.items():
            self.latency.observe(vocab_sort_key(num_seqs), self._extra_seconds(
                bucket, self._timing_batch(bucket, sorts_vocab=True), self._timing_batch(bucket)))

    def _extra_seconds(self, bucket: Bucket, batch: TokenBatch, plain: TokenBatch,
                       repeats: int = 3) -> float:
        """What ``batch`` costs over ``plain`` in a step of ``bucket``: the median difference
        of the two timed in turn, never below 0 (the first run of ``batch``, whose branch
        may not have run yet, is not timed)."""
        self._run_padding(batch, bucket)
        diffs = [self._run_padding(batch, bucket) - self._run_padding(plain, bucket)
                 for _ in range(repeats)]
        return max(0.0, float(np.median(diffs)))

    def _padding_times(self, batch, bucket, seconds: float, min_repeats: int) -> list[float]:
        """Seconds of padding steps of ``bucket`` after one untimed run, which compiles it
        where no engine has yet: at least ``min_repeats``, and more until ``seconds`` have
        passed. The first runs after a compile read slow (2026-12-05, tiny tier: the second
        and third run of a bucket took a median 1.10x, and up to 2x, the time of the
        fourth to twelfth), so a few-millisecond bucket gets many runs and the median."""
        self._run_padding(batch, bucket)
        times: list[float] = []
        while len(times) < min_repeats or sum(times) < seconds:
            times.append(self._run_padding(batch, bucket))
        return times

    def _run_padding(self, batch, bucket) -> float:
        t0 = time.perf_counter()
        out = self.runner.execute(RunStep(batch, bucket.train))
        jax.block_until_ready(out.next_tokens)
        return time.perf_counter() - t0

    # ----- convenience ----------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams,
                 adapter: str | None = None) -> list[list[int]]:
        """Runs prompts to completion (with any requests already queued); new ids per prompt."""
        for p in prompts:  # all or nothing: validate every prompt before queueing any
            self.model.check_tokens(p, "prompt")
        ids = [self.add_request(p, params, adapter=adapter, admission=False) for p in prompts]
        results: dict[str, list[int]] = {}
        while any(i not in results for i in ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out.output_token_ids
        return [results[i] for i in ids]
