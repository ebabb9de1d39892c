"""The inference engine: continuous batching over paged KV with chunked prefill.

Each ``step()`` schedules one iteration on the host (decode tokens of running
requests first, then prefill chunks of waiting requests, oldest first, within a
token budget and the free KV pages), packs it into a bucketed ``TokenBatch``,
runs the jitted step once, and turns the sampled tokens into outputs. When KV
pages run out the newest request is preempted: its pages are freed and it is
recomputed later from its prompt and the tokens it already produced, so its
output is unchanged.

The engine is single-threaded: callers (the gRPC server, ``generate``) own the
loop and call ``add_request``/``abort``/``step`` from one thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from coserve_jax.batch import Bucket, SeqChunk, build_batch, pick_bucket
from coserve_jax.engine_config import EngineConfig, derive_lengths
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.finetune.trainer import Trainer, TrainerConfig
from coserve_jax.kv_cache import KVCache, KVUsage, PageAllocator
from coserve_jax.latency import LatencyModel, bucket_key, model_file, piece_key
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.slots import AdapterRegistry
from coserve_jax.model import Model
from coserve_jax.sampling import MAX_SEED, SamplingParams
from coserve_jax.scheduler import BeforeFirstToken, Policy
from coserve_jax.slo import SLO, AdmissionError, RequestMetrics
from coserve_jax.step import (
    STEP_PROGRAM_VERSION,
    build_step,
    enable_compilation_cache,
    step_kernels,
)
from coserve_jax.telemetry import Profiler, ScalarWriter, backward_label, forward_label
from coserve_jax.tiny_model import cache_root


@dataclasses.dataclass
class Request:
    """Host state of one generation request."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival_index: int
    arrival_time: float
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0
    adapter: str | None = None
    slo: SLO | None = None
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Known tokens whose K/V are not yet in the cache."""
        return len(self.prompt) + len(self.output) - self.num_computed


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
    """Samples run whole (forward and full backward in one program: temporal-seq)."""


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None  # set when finished
    logprobs: list[float] | None = None
    """Logprob of each new token (raw distribution), when the request asked for logprobs."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per new token, the ``params.logprobs`` most likely (token id, logprob), best first."""


class Engine:
    """Continuous-batching inference over one model, one KV cache and one jitted step."""

    def __init__(self, model: Model, config: EngineConfig | None = None, mesh=None):
        self.model = model
        self.config = config = config or EngineConfig()
        mc = model.config
        # A ``jax.sharding.Mesh`` (sharding.make_mesh) serves sharded: weights, KV pages,
        # adapter slots and finetuning state each get their layout (sharding/layout.py).
        self.layout = None
        if mesh is not None:
            from sharding.layout import Layout

            self.layout = Layout(mesh, mc)
            self.model = model = self.layout.place_model(model)
        # Lengths and bucket axes, as `coserve plan` derives them (engine_config.py).
        self.lengths = lengths = derive_lengths(mc, config)
        self.max_model_len = lengths.max_model_len
        self.max_pages_per_seq = lengths.max_pages_per_seq
        enable_compilation_cache(config.kernels.compilation_cache_dir)
        cache = config.cache
        self.kv = (KVCache.zeros(mc, cache.num_pages, cache.page_size, model.dtype)
                   if self.layout is None else self.layout.zeros(
                       KVCache.zeros, mc, cache.num_pages, cache.page_size, model.dtype))
        self.allocator = PageAllocator(cache.num_pages, cache.page_size, self.max_pages_per_seq)
        self.registry = None
        if config.adapters.max_adapters:
            self.registry = AdapterRegistry(mc, config.adapters.max_adapters,
                                            config.adapters.max_lora_rank,
                                            config.adapters.lora_target_modules, model.dtype,
                                            layout=self.layout)
        # Resolved once, here: the step and the backward pieces share it.
        self.kernels = step_kernels(config.kernels.impl, self.layout)
        self.trainer = None
        ft = config.finetune
        if ft.max_train_seqs:
            self.trainer = Trainer(mc, self.registry, self.allocator, TrainerConfig(
                max_seqs=ft.max_train_seqs, max_len=lengths.max_train_len,
                window=ft.train_window, backward_layers=ft.backward_layers,
                attention_block=ft.backward_attention_block, block=ft.backward_block),
                model.dtype, layout=self.layout, kernels=self.kernels)
        self.buckets = tuple(sorted(
            (Bucket(t, s, w, train)
             for t in lengths.token_buckets
             for s in lengths.seq_buckets
             for w in lengths.page_buckets
             for train in ((False, True) if self.trainer else (False,))
             if s <= t),
            key=lambda b: (b.num_tokens, b.num_pages, b.num_seqs)))
        self._token_buckets = sorted({b.num_tokens for b in self.buckets})
        if self.layout is not None:
            self.layout.check_divides_tokens(self._token_buckets, "token buckets")
        self._step = build_step(mc, layout=self.layout, kernels=self.kernels)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._seed_rng = random.Random()
        self.num_steps = 0
        self.num_preemptions = 0
        # Totals since start: steps, inference_tokens, train_tokens, mixed_steps (inference
        # and finetuning tokens in one batch), backward_pieces.
        self.counters: collections.Counter[str] = collections.Counter()
        self.policy = Policy(config.scheduling.mode,
                             spend_banked=config.scheduling.spend_banked_slack)
        if self.policy.whole_samples and self.layout is not None:
            raise ValueError(f"mode {config.scheduling.mode} runs whole samples on one "
                             f"device; use coserve or temporal:N on a mesh")
        # Keyed by what sets step times: hardware, model and the shape parts of the config
        # (cache, buckets, adapters, finetune; never scheduling or telemetry settings).
        # The resolved kernels (not the requested "auto") and the step program's version
        # are part of the key too: both change what a bucket costs.
        shapes = (config.cache, config.buckets, config.adapters, config.finetune)
        self.latency_path = model_file(config.telemetry.latency_model_dir or cache_root(),
                                       jax.devices()[0].device_kind, jax.__version__, mc, shapes,
                                       self.kernels, STEP_PROGRAM_VERSION)
        self.latency = LatencyModel.load(self.latency_path) or LatencyModel()
        self._compiled: set[str] = set()  # latency keys whose shape has run in this process
        # Metrics of recently finished requests, newest last.
        self.finished: collections.deque[RequestMetrics] = collections.deque(maxlen=100_000)
        self.last_step: StepInfo | None = None
        self.profiler = Profiler()
        self.writer = (ScalarWriter(config.telemetry.run_dir)
                       if config.telemetry.run_dir else None)
        if self.trainer is not None:
            self.trainer.writer = self.writer
        self._logged = {"finished": 0, "counters": collections.Counter()}

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
            raise ValueError("params must be a SamplingParams")
        prompt = self.model.check_tokens(prompt, "prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) plus max_tokens "
                             f"({params.max_tokens}) is {total}, beyond the model length "
                             f"{self.max_model_len}")
        for t in params.stop_token_ids:
            if t >= self.model.config.vocab_size:
                raise ValueError(f"stop token id {t} is outside the vocabulary")
        self.allocator.check_fits(total - 1)  # the last sampled token needs no K/V
        if adapter is not None and (self.registry is None
                                    or adapter not in self.registry.names()):
            raise ValueError(f"unknown adapter {adapter!r}")
        if request_id is not None and str(request_id) in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        slo = slo or SLO(self.config.scheduling.default_ttft_s,
                         self.config.scheduling.default_tpot_s)
        if admission:
            self._admit(len(prompt), slo)
        index = next(self._arrivals)
        request_id = str(index) if request_id is None else str(request_id)
        seed = params.seed if params.seed is not None else self._seed_rng.randint(0, MAX_SEED)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, prompt, params, seed, index, arrival, adapter=adapter, slo=slo)
        self._requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def _admit(self, prompt_len: int, slo: SLO) -> None:
        """Refuses, rather than queues without bound, what cannot meet its TTFT."""
        if len(self.waiting) >= self.config.scheduling.max_waiting:
            raise AdmissionError(
                f"queue full ({self.config.scheduling.max_waiting} requests waiting)")
        if not self.config.scheduling.admission_control:
            return
        # Prefill tokens ahead of this request (its own included), at the rate a full
        # iteration clears them after the running requests' decode tokens.
        ahead = prompt_len + sum(r.pending for r in self.waiting)
        per_iteration = max(1, self.config.buckets.max_num_batched_tokens - len(self.running))
        full = self.buckets[-1] if not self.buckets[-1].train else next(
            b for b in reversed(self.buckets) if not b.train)
        estimate = -(-ahead // per_iteration) * self.latency.predict(bucket_key(full))
        if estimate > slo.ttft_s:
            raise AdmissionError(f"cannot meet the TTFT target of {slo.ttft_s:g}s: about "
                                 f"{estimate:.2f}s of prefill is queued ahead")

    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is and frees its pages; False if it is unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.allocator.free(req.request_id)
        req.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        """Inference requests or finetuning jobs still have work."""
        return bool(self.waiting or self.running) or (
            self.trainer is not None and self.trainer.has_work())

    # ----- adapters and jobs ----------------------------------------------------------------

    def load_adapter(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Writes an adapter into a slot; requests can name it at once. Never recompiles."""
        if self.registry is None:
            raise ValueError("this engine has no adapter slots (EngineConfig.max_adapters=0)")
        if self.trainer is not None and adapter.name in self.trainer.jobs:
            raise ValueError(f"{adapter.name!r} is the adapter of a finetuning job")
        self.registry.load(adapter, replace=replace)

    def unload_adapter(self, name: str) -> None:
        if self.registry is None or name not in self.registry.names():
            raise KeyError(f"no adapter named {name!r}")
        if self.trainer is not None and name in self.trainer.jobs:
            raise ValueError(f"{name!r} is the adapter of a finetuning job")
        users = [r.request_id for r in [*self.running, *self.waiting] if r.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} request(s)")
        self.registry.unload(name)

    def adapters(self) -> list[str]:
        return [] if self.registry is None else self.registry.names()

    def submit_job(self, job: FinetuneJob) -> JobProgress:
        """Starts (or resumes from its checkpoint) a finetuning job; raises ValueError."""
        if self.trainer is None:
            raise ValueError("this engine does not finetune (EngineConfig.max_train_seqs=0)")
        return self.trainer.submit(job)

    def job_progress(self, name: str) -> JobProgress:
        if self.trainer is None or name not in self.trainer.jobs:
            raise KeyError(f"no job named {name!r}")
        return self.trainer.jobs[name].progress()

    def cancel_job(self, name: str) -> None:
        if self.trainer is None or name not in self.trainer.jobs:
            raise KeyError(f"no job named {name!r}")
        self.trainer.cancel(name)

    def checkpoint_job(self, name: str) -> int | None:
        """Checkpoints a running job now; the step saved, or None if it has no checkpoint
        directory or is not running."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise KeyError(f"no job named {name!r}")
        return self.trainer.checkpoint(name)

    def remove_job(self, name: str) -> None:
        """Forgets a completed, cancelled or failed job and frees its adapter slot."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise KeyError(f"no job named {name!r}")
        self.trainer.remove(name)

    def trained_adapter(self, name: str) -> LoraAdapter:
        """A job's adapter with the weights of its latest optimizer step."""
        if self.trainer is None or name not in self.trainer.jobs:
            raise KeyError(f"no job named {name!r}")
        return self.trainer.adapter_of(self.trainer.jobs[name])

    def kv_usage(self) -> KVUsage:
        return self.allocator.usage()

    # ----- the iteration --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns the outputs of every request that advanced.

        Inference is scheduled first; the policy then sizes the finetuning forward
        windows and backward pieces the iteration can carry (see ``scheduler``).
        """
        with self.profiler.step(self.counters["iterations"]):
            outputs = self._iteration()
        self.counters["iterations"] += 1
        if (self.writer is not None
                and self.counters["iterations"] % self.config.telemetry.log_every == 0):
            self._log_serving()
        return outputs

    def close(self) -> None:
        """Finishes a trace in progress and writes out the TensorBoard event files."""
        self.profiler.stop()
        if self.writer is not None:
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
        self.writer.flush()

    def _iteration(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        trainer = self.trainer
        if trainer is None:
            ft_waiting = False
        elif self.policy.whole_samples:
            ft_waiting = trainer.has_sample_work()
        else:
            ft_waiting = trainer.has_forward_work() or trainer.next_piece_shape() is not None
        ft_iteration = self.policy.finetune_iteration(
            bool(self.running or self.waiting), ft_waiting, self._tpot_target())
        if ft_iteration and self.policy.whole_samples:
            return self._whole_sample_iteration(t_start)
        scheduled = [] if ft_iteration else self._schedule()
        chunks = [self._chunk(req, n) for req, n in scheduled]
        now = time.monotonic()  # the clock of first_token_time
        limit = self.policy.iteration_limit([r.slo.tpot_s for r in self.running],
                                            [self._progress(r, now) for r in self.running])
        windows, piece_s = [], 0.0
        used = sum(n for _, n in scheduled)
        left = self.config.buckets.max_num_batched_tokens - used
        if trainer is not None:
            # The piece this iteration would run: the furthest along that fits beside the
            # inference alone (or simply the furthest along when nothing limits the time).
            room = None if limit is None else limit - self._predict_step(chunks, 0)
            shape = trainer.next_piece_shape(
                None if room is None else lambda s: self.latency.predict(piece_key(*s)) <= room)
            piece_s = 0.0 if shape is None else self.latency.predict(piece_key(*shape))
            tokens = self.policy.forward_tokens(
                finetune_iteration=ft_iteration, inference_running=bool(scheduled),
                tokens_left=left, time_limit=limit, piece_seconds=piece_s,
                step_seconds=lambda n: self._predict_step(chunks, n),
                candidates=[t - used for t in self._token_buckets])
            windows = trainer.forward_windows(
                tokens, self.config.buckets.max_num_seqs - len(chunks))
        chunks += [chunk for _, chunk in windows]
        outputs, step_s, t_post, bucket = [], 0.0, 0.0, None
        t_device = time.perf_counter()
        if chunks:
            widest = max(len(c.page_table) for c in chunks)
            num_tokens = sum(len(c.token_ids) for c in chunks)
            bucket = pick_bucket(self.buckets, num_tokens, len(chunks), widest, bool(windows))
            batch = build_batch(chunks, bucket, self.config.cache.page_size)
            t_device = time.perf_counter()
            train = None if trainer is None else trainer.buffers
            decode = sum(1 for r, n in scheduled if n == 1 and r.output)
            label = forward_label(bucket, decode, sum(n for _, n in scheduled) - decode,
                                  sum(len(c.token_ids) for _, c in windows))
            with jax.profiler.TraceAnnotation(label):
                self.kv, train, out = self._step(self.model.params, self._slots(), self.kv,
                                                 train, batch, with_train=bucket.train)
                next_tokens = np.asarray(out.next_tokens)
                # Logprobs cross to the host only in iterations where someone asked.
                logprobs = None
                if any(r.params.logprobs is not None for r, _ in scheduled):
                    logprobs = (np.asarray(out.sampled_logprobs), np.asarray(out.top_logprobs),
                                np.asarray(out.top_token_ids))
            if trainer is not None:
                trainer.buffers = train
            step_s = time.perf_counter() - t_device
            self._observe(bucket_key(bucket), step_s)
            self.num_steps += 1
            train_tokens = sum(len(c.token_ids) for _, c in windows)
            self.counters.update(steps=1, inference_tokens=num_tokens - train_tokens,
                                 train_tokens=train_tokens,
                                 mixed_steps=int(bool(scheduled and windows)))
            t0 = time.perf_counter()
            outputs = [o for i, (req, n) in enumerate(scheduled)
                       if (o := self._advance(req, n, int(next_tokens[i]),
                                              _row_logprobs(logprobs, i, req.params))) is not None]
            if windows:
                trainer.after_forward(windows, np.asarray(out.seq_loss)[len(scheduled):])
            t_post = time.perf_counter() - t0
        pieces = 0
        if trainer is not None:
            pieces = self._run_backward(self.config.finetune.backward_pieces_per_step,
                                        self.policy.backward_seconds(
                finetune_iteration=ft_iteration, inference_running=bool(scheduled),
                tokens_left=left, time_limit=limit, step_seconds=step_s))
        total = time.perf_counter() - t_start
        self.policy.observe(total, had_inference=bool(scheduled),
                            had_finetune=bool(windows or pieces))
        # Host time: scheduling and batch packing before the step, bookkeeping after it.
        self.counters.update(host_s=(t_device - t_start) + t_post, iteration_s=total)
        self.last_step = StepInfo(sum(n for _, n in scheduled),
                                  sum(len(c.token_ids) for _, c in windows), pieces,
                                  ft_iteration, bucket, total)
        return outputs

    def _whole_sample_iteration(self, t_start: float) -> list[RequestOutput]:
        """A temporal-seq finetuning iteration: one whole sample, forward and backward, as a
        standard trainer runs it; no inference tokens."""
        with jax.profiler.TraceAnnotation("whole_sample"):
            tokens = self.trainer.run_whole_sample(self.model.params)
            jax.block_until_ready(self.trainer.buffers.grad_a)
        total = time.perf_counter() - t_start
        self.policy.observe(total, had_inference=False, had_finetune=True)
        self.counters.update(train_tokens=tokens, whole_samples=1, iteration_s=total)
        self.last_step = StepInfo(0, tokens, 0, True, None, total, whole_samples=1)
        return []

    def _run_backward(self, max_pieces: int, seconds: float) -> int:
        """Runs up to ``max_pieces`` backward pieces while the latency model says the next
        one fits in what is left of ``seconds``; times each for the latency model."""
        done, spent = 0, 0.0
        while done < max_pieces:
            def fits(shape, spent=spent):
                return spent + self.latency.predict(piece_key(*shape)) <= seconds

            shape = self.trainer.next_piece_shape(fits)
            if shape is None:
                break
            t0 = time.perf_counter()
            with jax.profiler.TraceAnnotation(backward_label(*shape)):
                self.trainer.run_backward_piece(self.model.params, fits)
                jax.block_until_ready(self.trainer.buffers.grads_h)
            seconds_taken = time.perf_counter() - t0
            self._observe(piece_key(*shape), seconds_taken)
            spent += seconds_taken
            done += 1
        self.counters["backward_pieces"] += done
        return done

    def _observe(self, key: str, seconds: float) -> None:
        """Feeds an observed time to the latency model, except a shape's first run in this
        process: it includes compilation, and a prediction inflated by it would keep the
        scheduler from ever running (and re-measuring) that shape beside inference."""
        if key in self._compiled:
            self.latency.observe(key, seconds)
        else:
            self._compiled.add(key)

    def _progress(self, req: Request, now: float):
        """What ``Policy.iteration_limit`` needs of a running request (clock: monotonic)."""
        if req.first_token_time is not None:
            return len(req.output) - 1, now - req.first_token_time
        # Prefill left after this iteration's chunk, at a full token budget per iteration.
        budget = self.config.buckets.max_num_batched_tokens
        return BeforeFirstToken(req.slo.ttft_s - (now - req.arrival_time),
                                -(-req.pending // budget))

    def _tpot_target(self) -> float | None:
        """The tightest TPOT target among running requests (None when none runs)."""
        return min((r.slo.tpot_s for r in self.running), default=None)

    def _predict_step(self, chunks: list[SeqChunk], train_tokens: int) -> float:
        """Predicted step seconds with ``train_tokens`` finetuning tokens added to ``chunks``."""
        trainer = self.trainer
        num_seqs = len(chunks)
        widest = max((len(c.page_table) for c in chunks), default=1)
        if train_tokens:
            windows, window_pages = trainer.window_shape(
                train_tokens, self.config.buckets.max_num_seqs - len(chunks))
            num_seqs += windows
            widest = max(widest, window_pages)
        num_tokens = sum(len(c.token_ids) for c in chunks) + train_tokens
        try:
            bucket = pick_bucket(self.buckets, num_tokens,
                                 min(num_seqs, self.config.buckets.max_num_seqs),
                                 min(widest, self.max_pages_per_seq), train_tokens > 0)
        except ValueError:
            return float("inf")
        return self.latency.predict(bucket_key(bucket))

    def _slots(self):
        return None if self.registry is None else self.registry.table

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.config.buckets.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        taken: set[str] = set()
        # Running requests: decodes (one pending token) first, then unfinished prefills.
        for req in sorted(self.running, key=lambda r: (r.pending > 1, r.arrival_index)):
            if budget == 0 or len(scheduled) == self.config.buckets.max_num_seqs:
                break
            if req not in self.running:  # preempted earlier in this loop
                continue
            n = min(req.pending, budget)
            if not self._make_room(req, req.num_computed + n, taken):
                continue
            self.allocator.grow(req.request_id, req.num_computed + n)
            scheduled.append((req, n))
            taken.add(req.request_id)
            budget -= n
        # Waiting requests, oldest first, while budget, sequence slots and pages last.
        while self.waiting and budget > 0 and len(scheduled) < self.config.buckets.max_num_seqs:
            req = self.waiting[0]
            n = min(req.pending, budget)
            if not self.allocator.can_grow(req.request_id, n):
                break
            self.waiting.popleft()
            self.allocator.grow(req.request_id, n)
            self.running.append(req)
            scheduled.append((req, n))
            taken.add(req.request_id)
            budget -= n
        return scheduled

    def _make_room(self, req: Request, num_tokens: int, taken: set[str]) -> bool:
        """Finetuning yields its pages first, then newer requests are preempted until ``req``
        can hold ``num_tokens``; False if req itself was preempted."""
        if (not self.allocator.can_grow(req.request_id, num_tokens)
                and self.trainer is not None and self.trainer.yield_pages()):
            self.counters["finetune_yields"] += 1
        while not self.allocator.can_grow(req.request_id, num_tokens):
            victims = [r for r in self.running if r.request_id not in taken]
            victim = max(victims, key=lambda r: r.arrival_index)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.allocator.free(req.request_id)
        self.running.remove(req)
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _chunk(self, req: Request, n: int) -> SeqChunk:
        p = req.params
        start = req.num_computed
        return SeqChunk(
            token_ids=req.tokens[start:start + n], start_position=start,
            page_table=self.allocator.page_table(req.request_id), temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, seed=req.seed, sample_count=len(req.output),
            adapter_slot=-1 if self.registry is None else self.registry.slot_of(req.adapter),
        )

    def _advance(self, req: Request, n: int, token: int,
                 logprobs: tuple[float, list[tuple[int, float]]] | None = None,
                 ) -> RequestOutput | None:
        req.num_computed += n
        if req.pending:  # mid-prefill: the sampled token is not the sequence's next one
            return None
        req.output.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        stop = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stop.update(self.model.config.eos_token_ids)
        if token in stop:
            req.finish_reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            req.finish_reason = "length"
        metrics = None
        if req.finish_reason is not None:
            self.running.remove(req)
            self.allocator.free(req.request_id)
            del self._requests[req.request_id]
            metrics = RequestMetrics(req.arrival_time, req.first_token_time, time.monotonic(),
                                     len(req.prompt), len(req.output), req.slo)
            self.finished.append(metrics)
        return RequestOutput(req.request_id, [token], list(req.output),
                             req.finish_reason is not None, req.finish_reason, metrics,
                             None if logprobs is None else [logprobs[0]],
                             None if logprobs is None else [logprobs[1]])

    # ----- compilation ----------------------------------------------------------------------

    def warmup(self, progress: bool = True, measure: bool = True) -> None:
        """Compiles the step for every bucket and measures the latency model.

        The timing batch writes nothing (every KV slot is padding) but takes the
        costly paths: all tokens use adapter slot 0 and all sequences sample.
        A latency model saved by an earlier run with the same hardware, model and
        config is reused instead of measuring again.
        """
        measure = measure and not self.latency.times
        self._compiled.update(bucket_key(b) for b in self.buckets)
        for bucket in tqdm(self.buckets, desc="compiling buckets", disable=not progress):
            batch = build_batch([], bucket, self.config.cache.page_size)
            if self.registry is not None:
                batch = batch.replace(adapter_slots=np.zeros_like(batch.adapter_slots))
            batch = batch.replace(temperature=np.ones_like(batch.temperature))
            times = [self._run_padding(batch, bucket) for _ in range(3 if measure else 1)]
            if measure:
                self.latency.observe(bucket_key(bucket), float(np.median(times[1:])))
        if self.trainer is not None and self.policy.whole_samples:
            self.trainer.warmup_samples(self.model.params, progress)
        if self.trainer is not None:
            times = self.trainer.warmup(self.model.params, progress, repeats=3 if measure else 1)
            self._compiled.update(piece_key(*shape) for shape in times)
            for shape, seconds in times.items():
                if measure:
                    self.latency.observe(piece_key(*shape), seconds)
        if measure:
            self.latency.save(self.latency_path)

    def _run_padding(self, batch, bucket) -> float:
        t0 = time.perf_counter()
        train = None if self.trainer is None else self.trainer.buffers
        self.kv, train, out = self._step(self.model.params, self._slots(), self.kv, train,
                                         batch, with_train=bucket.train)
        if self.trainer is not None:
            self.trainer.buffers = train
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


def _row_logprobs(logprobs, row: int, params: SamplingParams
                  ) -> tuple[float, list[tuple[int, float]]] | None:
    """Row ``row``'s (sampled token's logprob, top ``params.logprobs`` pairs), if asked for."""
    if logprobs is None or params.logprobs is None:
        return None
    sampled, top, top_ids = logprobs
    n = params.logprobs
    return float(sampled[row]), [(int(t), float(v)) for t, v in zip(top_ids[row, :n],
                                                                     top[row, :n], strict=True)]
