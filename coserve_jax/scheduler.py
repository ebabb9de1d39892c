"""The scheduler: request queues, KV pages, preemption, admission, and each iteration's plan.

One engine iteration has three stages, in the manner of vLLM v1's engine core:

1. ``Scheduler.schedule`` decides, from host state alone, everything the iteration
   runs and returns it as an ``IterationPlan``: decode tokens of running requests
   first, then prefill chunks of waiting ones (oldest first, within the token budget,
   the free KV pages and the time the decoding requests allow, so that a long prompt
   enters over several iterations; when pages run out the newest request is preempted
   and later recomputed from its prompt and the tokens it produced, so its output is
   unchanged);
   then, through the ``policy.Policy``, the finetuning forward windows that fit beside
   them (the trainer proposes windows, the scheduler prices each proposal with the
   latency model and commits the one it picks), the time left for backward pieces, or
   a whole-sample iteration (``temporal-seq``; an idle ``coserve`` iteration with
   ``idle_whole_samples``; or, with coserve's whole-sample unit, one that the slack the
   running requests left covers: ``Policy.sample_fits``; a sample too long ever to run
   whole beside requests runs in parts, iterations of their own, and at token level only
   if its longest part is too long as well: ``Scheduler._sample_unit``).
2. The engine hands the plan's batch to the ``runner.Runner`` (the device), then the
   backward pieces.
3. ``Scheduler.update`` applies what the step sampled, matched by request id, and
   returns the outputs of the requests that advanced.

Scheduling advances each request's ``num_computed`` when it plans the tokens, and a
row whose chunk reaches the end of the request's known tokens puts one token "in
flight". That lets the engine plan iteration i+1 while iteration i still runs on the
device: a request with a token in flight is scheduled as a decode whose token id the
step reads from the previous step's samples on the device (``SeqChunk.feed_row``). A
request never plans past ``max_tokens``; one that stops on a stop token in iteration i
may have had one more token computed in i+1, which ``update`` drops, so outputs are
those of the synchronous loop.

The scheduler holds no device arrays and runs no programs: tests drive it with a
latency model and no model at all.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import numpy as np

from coserve_jax.batch import Bucket, SeqChunk, TokenBatch, build_batch, pick_bucket
from coserve_jax.finetune.trainer import InFlight, Trainer
from coserve_jax.kv_cache import PageAllocator
from coserve_jax.latency import LatencyModel, bucket_key, piece_key, sample_key, sample_part_key
from coserve_jax.lora.slots import AdapterRegistry
from coserve_jax.policy import BeforeFirstToken, Policy
from coserve_jax.sampling import SamplingParams
from coserve_jax.slo import SLO, AdmissionError, RequestMetrics

PARTS_OVERHEAD = 1.1
"""A sample that fits its requests' slack whole runs in parts for their TPOT target only if
its parts cost at most this many times the whole sample (``Scheduler._sample_unit``)."""


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
    num_computed: int = 0  # tokens whose K/V are in the cache or planned into it
    in_flight: int = 0  # sampled tokens planned but not yet seen by the host (0 or 1)
    feed_row: int = -1  # the batch row of its token in flight, in the last planned step
    finish_reason: str | None = None
    num_preemptions: int = 0
    adapter: str | None = None
    slo: SLO | None = None
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_known(self) -> int:
        """Tokens of the sequence so far: prompt, output and the token in flight."""
        return len(self.prompt) + len(self.output) + self.in_flight

    @property
    def pending(self) -> int:
        """Tokens whose K/V are neither in the cache nor planned into it."""
        return self.num_known - self.num_computed

    @property
    def sorts_vocab(self) -> bool:
        """It samples at temperature > 0: the steps it is in sort the vocabulary."""
        return self.params.temperature > 0

    @property
    def done_sampling(self) -> bool:
        """Every token it may produce is produced or in flight (``max_tokens``)."""
        return len(self.output) + self.in_flight >= self.params.max_tokens


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


@dataclasses.dataclass(frozen=True)
class ScheduledRow:
    """One inference sequence of a planned step (its batch row is its index)."""

    request: Request
    num_tokens: int
    samples: bool
    """The chunk reaches the end of the request's known tokens: its sampled token is the
    request's next one (False mid-prefill: the sample is dropped)."""


def windows_loss_rows(windows) -> int:
    """Rows carrying a finetuning loss among a plan's ``(in flight, chunk)`` windows: what
    the step's loss head runs over (``latency.loss_head_key``)."""
    return sum(int(np.count_nonzero(c.loss_weights)) for _, c in windows)


@dataclasses.dataclass(frozen=True)
class IterationPlan:
    """Everything one iteration runs, decided before anything runs."""

    rows: tuple[ScheduledRow, ...] = ()
    """Inference sequences, batch rows ``0 .. len(rows) - 1``."""
    windows: tuple[tuple[InFlight, SeqChunk], ...] = ()
    """Finetuning forward windows, the batch rows after the inference ones."""
    bucket: Bucket | None = None
    batch: TokenBatch | None = None
    """The packed step input (numpy); None when the iteration runs no step."""
    finetune_iteration: bool = False
    """A temporal-sharing finetuning-only iteration."""
    whole_sample: bool = False
    """Run one whole training sample instead of a step (``temporal-seq``)."""
    sample_part: bool = False
    """With ``whole_sample``: run the next part of a sample run in parts instead
    (``Trainer.run_sample_part``; coserve: ``Scheduler._sample_unit`` says when)."""
    time_limit: float | None = None
    """Seconds the iteration may take (``Policy.iteration_limit``; serving no request,
    ``Policy.idle_limit``); None: no bound."""
    tokens_left: int = 0
    """Token budget the iteration left unused."""
    tpot_target: float | None = None
    """The tightest TPOT target of the requests running when it was planned (None: none)."""
    token_fallback: bool = False
    """coserve's whole-sample unit finetunes at token level in this iteration beside its
    requests (``Scheduler._token_fallback``)."""
    slots_full: bool = False
    """Requests wait for a sequence slot (``Scheduler.slots_full``): nothing finetunes beside
    this iteration's inference."""
    slot_headroom_s: float | None = None
    """The most the iteration may take with finetuning beside its inference before the
    stretch would fill the sequence slots (``Policy.slot_headroom``; None: no bound); its
    ``time_limit`` is within it."""
    inference_s: float = 0.0
    """Predicted seconds of the step of this iteration's inference alone (0: it serves
    none): what its finetuning adds to the iteration is the rest."""

    @property
    def inference_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def finetune_tokens(self) -> int:
        return sum(len(c.token_ids) for _, c in self.windows)

    @property
    def decode_rows(self) -> int:
        return sum(1 for r in self.rows if r.num_tokens == 1 and r.request.output)

    @property
    def sorts_vocab(self) -> bool:
        """Some row samples at temperature > 0: the step sorts the vocabulary (all-greedy
        steps skip it; ``latency.vocab_sort_key``)."""
        return self.batch is not None and bool((self.batch.temperature > 0).any())

    @property
    def loss_rows(self) -> int:
        """Rows carrying a finetuning loss: what the step's loss head runs over
        (``latency.loss_head_key``)."""
        return windows_loss_rows(self.windows)


class Scheduler:
    """Queues and pages of one engine, and the plan of each of its iterations."""

    def __init__(self, *, buckets: tuple[Bucket, ...], page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_pages_per_seq: int, max_waiting: int,
                 admission_control: bool, allocator: PageAllocator, latency: LatencyModel,
                 policy: Policy, eos_token_ids: tuple[int, ...],
                 registry: AdapterRegistry | None = None, trainer: Trainer | None = None,
                 idle_whole_samples: bool = False, slo_prefill_chunks: bool = True,
                 finetune_unit: str = "tokens", arrival_ttft_s: float | None = None,
                 cheapest_bucket: bool = True):
        self.buckets = buckets
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = max_pages_per_seq
        self.max_waiting = max_waiting
        self.admission_control = admission_control
        self.allocator = allocator
        self.latency = latency
        self.policy = policy
        self.eos_token_ids = tuple(eos_token_ids)
        self.registry = registry
        self.trainer = trainer
        self.idle_whole_samples = idle_whole_samples
        """An iteration with nothing to serve runs a whole sample (``SchedulingConfig``)."""
        self.slo_prefill_chunks = slo_prefill_chunks
        """Prefill chunks are sized to what the decoding requests allow
        (``SchedulingConfig``)."""
        self.finetune_unit = finetune_unit
        self.cheapest_bucket = cheapest_bucket
        """A step runs in the bucket holding it that the latency model prices lowest, not
        in the smallest (``SchedulingConfig``, ``bucket_for``)."""
        self._cheapest: dict[tuple[Bucket, bool, int], Bucket] | None = None
        """``bucket_for``'s answers during one ``schedule`` call (None outside one)."""
        # Every bucket's larger buckets: those that hold whatever it holds.
        self._larger = {b: [h for h in buckets if h != b and h.holds(b)] for b in buckets}
        self.arrival_ttft_s = arrival_ttft_s
        """TTFT target of the requests that set none: one may arrive during a whole sample
        (``Policy.sample_fits``)."""
        self._last_step_s = 0.0  # predicted step seconds of the last plan that served requests
        # The last plan ran a sample unit while requests were present (``_sample_due``).
        self._sample_ran_last = False
        self.token_buckets = sorted({b.num_tokens for b in buckets})
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.arrivals = itertools.count()
        self.num_preemptions = 0
        self.finetune_yields = 0
        self.slot_waits = 0
        """Iterations planned while requests waited for a sequence slot (``slots_full``)."""
        # Metrics of recently finished requests, newest last.
        self.finished: collections.deque[RequestMetrics] = collections.deque(maxlen=100_000)

    # ----- requests -------------------------------------------------------------------------

    def admit(self, prompt_len: int, slo: SLO, sorts_vocab: bool = False) -> None:
        """Refuses, rather than queues without bound, what cannot meet its TTFT; raises
        ``AdmissionError``. ``sorts_vocab``: the request samples at temperature > 0."""
        if len(self.waiting) >= self.max_waiting:
            raise AdmissionError(f"queue full ({self.max_waiting} requests waiting)")
        if not self.admission_control:
            return
        # Prefill tokens ahead of this request (its own included), at the rate iterations
        # clear them beside the running requests' decode tokens, each iteration priced at
        # the step bucket it would use: full token budgets, then the rest. (Pricing every
        # one at the largest bucket, the widest page tables included, refused every short
        # prompt whenever that bucket alone was measured above its TTFT target.)
        queued = [*self.running, *self.waiting]
        ahead = prompt_len + sum(r.pending for r in self.waiting)
        decodes = len(self.running)
        per_iteration = max(1, self.max_num_batched_tokens - decodes)
        full, rest = divmod(ahead, per_iteration)
        seqs = len(queued) + 1
        widest = -(-max([prompt_len] + [r.num_known + 1 for r in queued]) // self.page_size)
        sorts = sorts_vocab or any(r.sorts_vocab for r in queued)
        estimate = full * self._predict_shape(decodes + per_iteration, seqs, widest, False,
                                              sorts)
        if rest:
            estimate += self._predict_shape(decodes + rest, seqs, widest, False, sorts)
        if estimate > slo.ttft_s:
            raise AdmissionError(f"cannot meet the TTFT target of {slo.ttft_s:g}s: about "
                                 f"{estimate:.2f}s of prefill is queued ahead")

    def add(self, req: Request) -> None:
        """Queues a validated request."""
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is and frees its pages; False if it is unknown. A
        step still running with it writes pages that nothing reads any more."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.allocator.free(req.request_id)
        req.finish_reason = "abort"
        return True

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def tpot_target(self) -> float | None:
        """The tightest TPOT target among running requests (None when none runs)."""
        return min((r.slo.tpot_s for r in self.running), default=None)

    # ----- 1. schedule ----------------------------------------------------------------------

    def schedule(self, queued_s: float = 0.0) -> IterationPlan:
        """The next iteration's plan; commits it (pages, request and training progress).

        ``queued_s``: predicted seconds of device work dispatched before this plan that
        has not finished (the overlapped loop's previous iteration); this iteration's
        tokens land after it, which the requests' time budgets account for."""
        # Planning prices many shapes, and the latency model holds still while it does, so
        # each shape's cheapest bucket is looked up once a plan (``bucket_for``).
        self._cheapest = {}
        try:
            return self._plan(queued_s)
        finally:
            self._cheapest = None

    def _plan(self, queued_s: float) -> IterationPlan:
        trainer = self.trainer
        follows_sample, self._sample_ran_last = self._sample_ran_last, False
        if not self.has_requests():
            self.policy.slack_credit = 0.0  # a lull: what the last requests left is theirs
            unit = (self._sample_unit() if self.idle_samples and trainer is not None
                    and not trainer.has_inflight() else None)
            if unit is not None:
                seconds, part = unit
                step_s, arrival_ttft_s = self._last_step_s, self._arrival_ttft()
                if (self.policy.sample_too_long(seconds, step_s, arrival_ttft_s, queued_s)
                        and not self.policy.sample_too_long(seconds, step_s, arrival_ttft_s)):
                    return IterationPlan()  # the queued work drains first; the sample is next
                # (Too long even then: the part of a sample under way whose price has grown
                # since it started. It runs: the sample holds its residuals until it ends.)
                return IterationPlan(finetune_iteration=True, whole_sample=True,
                                     sample_part=part)
        elif (not follows_sample and not self.slots_full()
              and (unit := self._sample_due(queued_s)) is not None):
            # While requests are present no sample unit follows another: the requests step
            # between them (the credit may cover several units; they are spread, not burst).
            self._sample_ran_last = True
            return IterationPlan(finetune_iteration=True, whole_sample=True, sample_part=unit[1],
                                 tpot_target=self.tpot_target())
        if trainer is None:
            ft_waiting = False
        elif self.policy.whole_samples:
            ft_waiting = trainer.has_sample_work()
        else:
            ft_waiting = trainer.has_forward_work() or trainer.next_piece_shape() is not None
        ft_iteration = self.policy.finetune_iteration(
            self.has_requests(), ft_waiting, self.tpot_target())
        if ft_iteration and self.policy.whole_samples:
            return IterationPlan(finetune_iteration=True, whole_sample=True)
        scheduled = [] if ft_iteration else self._schedule_requests(queued_s)
        chunks = [self._chunk(req, n) for req, n in scheduled]
        rows = []
        for row, (req, n) in enumerate(scheduled):
            samples = req.num_computed + n == req.num_known
            req.num_computed += n
            if samples:
                req.in_flight += 1
                req.feed_row = row
            rows.append(ScheduledRow(req, n, samples))
        sampling = {row.request.request_id for row in rows if row.samples}
        now = time.monotonic()  # the clock of first_token_time
        inference_s = self._predict(chunks, [])  # the step of this iteration's inference alone
        headroom = None
        if chunks:
            limit = self.policy.iteration_limit([r.slo.tpot_s for r in self.running],
                                                [self._progress(r, now + queued_s, sampling)
                                                 for r in self.running])
            headroom = self.policy.slot_headroom(inference_s,
                                                 len(self.running) + len(self.waiting),
                                                 self.max_num_seqs)
            if limit is not None and headroom is not None:
                limit = min(limit, headroom)
        else:  # serving no request: what a request arriving now can wait for
            limit = self.policy.idle_limit(self._arrival_ttft(), self._last_step_s, queued_s)
        used = sum(n for _, n in scheduled)
        left = self.max_num_batched_tokens - used
        windows = []
        if scheduled:
            fallback_new = self._token_fallback()
        else:  # no inference: a sample too long to run whole starts at token level, alone
            too_long = (self.idle_samples and trainer is not None
                        and self._next_sample_too_long())
            fallback_new = 1 if too_long else None
        slots_full = self.slots_full()
        self.slot_waits += slots_full
        yields_to_queue = slots_full and bool(scheduled)  # (nothing finetunes beside them)
        if trainer is not None and not yields_to_queue:
            windows = trainer.commit_windows(self._choose_windows(
                chunks, ft_iteration, bool(scheduled), left, limit, used, inference_s,
                fallback_new))
        chunks += [chunk for _, chunk in windows]
        bucket = batch = None
        if chunks:
            widest = max(len(c.page_table) for c in chunks)
            num_tokens = sum(len(c.token_ids) for c in chunks)
            bucket = self.bucket_for(num_tokens, len(chunks), widest, bool(windows),
                                     any(c.temperature > 0 for c in chunks),
                                     windows_loss_rows(windows))
            batch = build_batch(chunks, bucket, self.page_size)
        plan = IterationPlan(tuple(rows), tuple(windows), bucket, batch, ft_iteration,
                             time_limit=limit, tokens_left=left, tpot_target=self.tpot_target(),
                             token_fallback=fallback_new is not None,
                             slots_full=yields_to_queue, slot_headroom_s=headroom,
                             inference_s=inference_s if rows else 0.0)
        if rows:
            self._last_step_s = self.predicted_step_seconds(plan)
        return plan

    def slots_full(self) -> bool:
        """Requests wait while ``max_num_seqs`` run. A waiting request's TTFT then runs until
        a running one finishes, every iteration of the running ones' remaining tokens
        later, so finetuning that stretches those iterations spends the waiting one's TTFT
        many times over (and keeps more requests in flight, which keeps the slots full):
        while it holds, no finetuning runs beside inference (no whole sample, no windows,
        no backward piece)."""
        return bool(self.waiting) and len(self.running) >= self.max_num_seqs

    # ----- the finetuning unit --------------------------------------------------------------

    @property
    def finetune_unit(self) -> str:
        """coserve's unit of finetuning while requests run: "tokens" (windows beside them and
        backward pieces) or "samples" (whole samples funded by their slack)."""
        return "samples" if self.policy.samples_beside_inference else "tokens"

    @finetune_unit.setter
    def finetune_unit(self, unit: str) -> None:
        if unit not in ("tokens", "samples"):
            raise ValueError(f"finetune_unit must be 'tokens' or 'samples'; got {unit!r}")
        self.policy.samples_beside_inference = unit == "samples"

    @property
    def idle_samples(self) -> bool:
        """An iteration with nothing to serve runs a whole sample."""
        return self.idle_whole_samples or self.policy.samples_beside_inference

    def finetune_costs(self) -> dict[str, float] | None:
        """Predicted seconds per finetuning token of each unit, for a sample of the longest
        training bucket beside half a batch of decodes: "samples" (the whole sample in one
        program) and "tokens" (its forward tokens' share of steps that fill the token budget
        beside the decodes, plus its backward pieces); None until the latency model has
        measured them (``Engine.warmup``)."""
        trainer = self.trainer
        if trainer is None:
            return None
        n = trainer.seq_buckets[-1]
        sample = self.latency.predict(sample_key(n))
        shape, pieces = trainer.pieces_per_sequence(n)
        piece = self.latency.predict(piece_key(*shape))
        decodes = max(1, self.max_num_seqs // 2)
        forward = self.max_num_batched_tokens - decodes
        pages = -(-n // self.page_size)
        windows = -(-forward // trainer.config.window)
        mixed = self._predict_shape(decodes + forward, decodes + windows, pages, True,
                                    loss_rows=forward)
        alone = self._predict_shape(decodes, decodes, pages, False)
        if not (sample and piece and alone) or forward <= 0 or mixed == float("inf"):
            return None
        return {"samples": sample / n, "tokens": (mixed - alone) / forward + pieces * piece / n}

    def choose_finetune_unit(self, costs: dict[str, float] | None = None) -> str:
        """Sets the unit that costs less per token (``costs``, default ``finetune_costs()``;
        tokens when unknown) and returns it: ``SchedulingConfig.finetune_unit="auto"``."""
        costs = self.finetune_costs() if costs is None else costs
        self.finetune_unit = ("samples" if costs and costs["samples"] < costs["tokens"]
                              else "tokens")
        return self.finetune_unit

    def _sample_due(self, queued_s: float) -> tuple[float, bool] | None:
        """The whole-sample unit: the ``_sample_unit`` this iteration runs while requests run
        (``Policy.sample_fits``), or None. Sequences in flight at token level
        (``_token_fallback``) need not finish first: a whole sample adds its gradients to the
        same accumulators and touches nothing else of theirs."""
        trainer = self.trainer
        if not self.policy.samples_beside_inference or trainer is None:
            return None
        unit = self._sample_unit()
        if unit is None:
            return None
        sample_s = unit[0]
        now = time.monotonic() + queued_s
        requests = self.running + list(self.waiting)
        progress, ahead = [], 0
        for req in requests:
            done = self._progress(req, now, set())
            if isinstance(done, BeforeFirstToken):
                # Its first token also waits for the prompts ahead of it in the queue.
                ahead += req.pending
                done = dataclasses.replace(
                    done, prefill_iterations=-(-ahead // self.max_num_batched_tokens))
            progress.append(done)
        # The part of a sample under way is held to the present requests' deadlines only:
        # were its price to grow past what an arrival can wait for, it would never run.
        arrival_ttft_s = None if trainer.sample_in_parts() else self._arrival_ttft()
        fits = self.policy.sample_fits(sample_s, self._last_step_s,
                                       [r.slo.tpot_s for r in requests], progress,
                                       arrival_ttft_s=arrival_ttft_s)
        if not fits:
            # Capped while the sample waits, not before it runs: the iteration whose slack
            # made the credit cover the sample banked some beyond its price, which stays
            # (capping first dropped about a sixth of the credit on the tiny tier, whose
            # parts cost about two iterations' slack).
            self.policy.cap_credit(sample_s)
        return unit if fits else None

    def _arrival_ttft(self) -> float | None:
        """The TTFT target of a request that may arrive now: the default one, or the
        tightest of the present requests' where that is tighter."""
        targets = [r.slo.ttft_s for r in (*self.running, *self.waiting)]
        targets += [self.arrival_ttft_s] if self.arrival_ttft_s else []
        return min(targets, default=None)

    def _sample_unit(self) -> tuple[float, bool] | None:
        """coserve's next iteration of whole-sample work: (its predicted seconds, whether
        it runs a part of a sample in parts). That is the next part of the sample in parts
        under way; else the next sample, in parts where the whole would delay the present
        requests' next token by more than their tightest TPOT target and its parts cost at
        most ``PARTS_OVERHEAD`` times the whole (smaller units fit the slack the requests
        bank, and their deadlines, more often: measured on the small tier), or where a
        request arriving during it could not wait for it (``Policy.sample_too_long``), as
        long as its parts are measured and the longest is not too long as well; else whole.
        None: no sample, or the next is too long to run beside requests either way (it runs
        at token level: ``_next_sample_too_long``)."""
        trainer = self.trainer
        nxt = trainer.next_sample_part()
        if nxt is None:
            return None
        bucket, index = nxt
        count = trainer.sample_parts
        if trainer.sample_in_parts():
            return self.latency.predict(sample_part_key(bucket, index, count)), True
        whole = self.latency.predict(sample_key(bucket))
        step_s, arrival_ttft_s = self._last_step_s, self._arrival_ttft()
        too_long = self.policy.sample_too_long(whole, step_s, arrival_ttft_s)
        tpot_s = min((r.slo.tpot_s for r in (*self.running, *self.waiting)), default=None)
        if count > 1 and (too_long or (tpot_s is not None and whole > tpot_s)):
            # (A part never measured, ``Engine.warmup`` having judged it needless, would
            # compile as it runs.)
            parts = [self.latency.predict(sample_part_key(bucket, i, count))
                     for i in range(count)]
            # A short sample's parts cost more than it does whole (each part's program
            # reads its segment's weights again: 1.5x at 32 tokens on the small tier, 0.97x
            # at 256): split for the TPOT target only where that costs little.
            cheap = sum(parts) <= PARTS_OVERHEAD * whole
            if (all(parts) and (too_long or cheap)
                    and not self.policy.sample_too_long(max(parts), step_s, arrival_ttft_s)):
                return parts[0], True
        return None if too_long else (whole, False)

    def _next_sample_too_long(self) -> bool:
        """The whole-sample unit: the next sample may never run beside requests, whole or in
        parts (``_sample_unit``)."""
        return self.trainer.has_sample_work() and self._sample_unit() is None

    def _token_fallback(self) -> int | None:
        """The whole-sample unit, in an iteration serving requests: whether its finetuning
        goes at token level, windows beside the requests and pieces after them, as the
        token-level unit runs it, and if so how many new sequences it may start (None: it
        does not). It does for the sequences already in flight at token level, and for a
        next sample too long ever to run whole beside requests, the one new sequence it
        starts: without that, such a sample would wait for a lull, and every sample after
        it with it. Other samples wait for whole-sample iterations."""
        trainer = self.trainer
        if not self.policy.samples_beside_inference or trainer is None:
            return None
        too_long = self._next_sample_too_long()
        return int(too_long) if too_long or trainer.has_inflight() else None

    def _choose_windows(self, chunks: list[SeqChunk], ft_iteration: bool,
                        inference_running: bool, left: int, limit: float | None, used: int,
                        inference_s: float, fallback_new: int | None = None):
        """The trainer's proposal the policy picks: the largest budget whose step, plus the
        backward piece this iteration would run, the latency model says fits.
        ``inference_s``: the predicted step of ``chunks`` alone; ``fallback_new``:
        ``_token_fallback``'s answer."""
        trainer = self.trainer
        max_seqs = self.max_num_seqs - len(chunks)
        # With nothing to serve (a request whose last token is in flight cannot be) and
        # idle_whole_samples, the sequences in flight finish and no new one starts at token
        # level: the next idle iteration runs a whole sample, unless the next sample is
        # too long to run whole (``fallback_new``).
        start_new = (fallback_new is not None
                     or not (self.idle_samples and not inference_running and not self.waiting))
        # The piece this iteration would run: the furthest along that fits beside the
        # inference alone (or simply the furthest along when nothing limits the time).
        room = None if limit is None else limit - inference_s
        shape = trainer.next_piece_shape(
            None if room is None else lambda s: self.latency.predict(piece_key(*s)) <= room)
        piece_s = 0.0 if shape is None else self.latency.predict(piece_key(*shape))
        proposals = {}

        def step_seconds(n: int) -> float:
            if n not in proposals:
                proposals[n] = (trainer.propose_windows(n, max_seqs, start_new, fallback_new)
                                if n else [])
            if not chunks and not proposals[n]:
                return 0.0  # no step runs
            return self._predict(chunks, proposals[n])

        tokens = self.policy.forward_tokens(
            finetune_iteration=ft_iteration, inference_running=inference_running,
            tokens_left=left, time_limit=limit, piece_seconds=piece_s,
            step_seconds=step_seconds, candidates=[t - used for t in self.token_buckets],
            token_fallback=fallback_new is not None,
            piece_ready=not inference_running and trainer.next_piece_shape() is not None)
        if not tokens:
            return []
        return proposals.get(tokens) or trainer.propose_windows(tokens, max_seqs, start_new,
                                                                 fallback_new)

    def backward_seconds(self, plan: IterationPlan, step_seconds: float) -> float:
        """Seconds of backward pieces the iteration may run after a step that took (or is
        predicted to take) ``step_seconds``."""
        if plan.slots_full:
            return 0.0
        stall_piece_s = 0.0
        if not plan.rows and not plan.windows and self.trainer is not None:
            shape = self.trainer.next_piece_shape()
            stall_piece_s = 0.0 if shape is None else self.latency.predict(piece_key(*shape))
        return self.policy.backward_seconds(
            finetune_iteration=plan.finetune_iteration,
            inference_running=bool(plan.rows), tokens_left=plan.tokens_left,
            time_limit=plan.time_limit, step_seconds=step_seconds,
            token_fallback=plan.token_fallback, stall_piece_s=stall_piece_s)

    def predicted_step_seconds(self, plan: IterationPlan) -> float:
        if plan.bucket is None:
            return 0.0
        return self.latency.step_seconds(plan.bucket, plan.sorts_vocab, plan.loss_rows)

    def _predict(self, chunks: list[SeqChunk], windows) -> float:
        """Predicted step seconds of ``chunks`` plus the proposed finetuning ``windows``
        (each window's tokens priced as rows with a loss: at most that many have one)."""
        widest = max([len(c.page_table) for c in chunks] + [w.pages for w in windows],
                     default=1)
        forward = sum(w.n for w in windows)
        num_tokens = sum(len(c.token_ids) for c in chunks) + forward
        return self._predict_shape(num_tokens, len(chunks) + len(windows), widest,
                                   bool(windows), any(c.temperature > 0 for c in chunks),
                                   loss_rows=forward)

    def _predict_shape(self, num_tokens: int, num_seqs: int, widest: int,
                       train: bool, sorts_vocab: bool = False, loss_rows: int = 0) -> float:
        """Predicted seconds of the step bucket that holds this many tokens and sequences,
        the longest with ``widest`` pages (inf when none does); ``sorts_vocab``: some row
        samples at temperature > 0; ``loss_rows``: rows carrying a finetuning loss."""
        try:
            bucket = self.bucket_for(num_tokens, min(num_seqs, self.max_num_seqs),
                                     min(widest, self.max_pages_per_seq), train, sorts_vocab,
                                     loss_rows)
        except ValueError:
            return float("inf")
        return self.latency.step_seconds(bucket, sorts_vocab, loss_rows)

    def bucket_for(self, num_tokens: int, num_seqs: int, widest: int, train: bool,
                   sorts_vocab: bool = False, loss_rows: int = 0) -> Bucket:
        """The bucket a step of this many tokens and sequences, the longest ``widest`` pages
        long, runs in (``ValueError`` when none holds it): the smallest that holds it, or
        with ``cheapest_bucket`` the one of those holding it that the latency model prices
        lowest (the smallest of equal prices; the smallest when that one is unmeasured).
        Padding never makes less work, but it can make a better program: on the 2-core CPU
        with XLA (tiny tier, 2026-12-06) a decode step of 16 rows took 9.2 ms where one of 8
        rows took 13.9 ms, at 32 pages, and 6.2 ms against 7.2 ms at 16 pages."""
        smallest = pick_bucket(self.buckets, num_tokens, num_seqs, widest, train)
        if not self.cheapest_bucket:
            return smallest
        key = (smallest, sorts_vocab, loss_rows)
        if self._cheapest is not None and key in self._cheapest:
            return self._cheapest[key]
        best, best_s = smallest, self._bucket_seconds(smallest, sorts_vocab, loss_rows)
        if best_s > 0:
            for bucket in self._larger[smallest]:
                seconds = self._bucket_seconds(bucket, sorts_vocab, loss_rows)
                if 0 < seconds < best_s:
                    best, best_s = bucket, seconds
        if self._cheapest is not None:
            self._cheapest[key] = best
        return best

    def _bucket_seconds(self, bucket: Bucket, sorts_vocab: bool, loss_rows: int) -> float:
        """``LatencyModel.step_seconds`` of ``bucket``; 0 when the bucket itself is
        unmeasured."""
        if not self.latency.predict(bucket_key(bucket)):
            return 0.0
        return self.latency.step_seconds(bucket, sorts_vocab, loss_rows)

    def _progress(self, req: Request, now: float, sampling: set[str]):
        """What ``Policy.iteration_limit`` needs of a running request (clock: monotonic;
        ``now``: when the work queued before this iteration will have finished).
        ``sampling``: ids of the requests this iteration samples a token for."""
        # Tokens in flight from earlier iterations (the overlapped loop) count as produced
        # by ``now``; a first token among them starts the TPOT clock then, so from the
        # next iteration on such a request is decoding (with nothing banked), not in prefill.
        landed = req.in_flight - (req.request_id in sampling)
        if req.first_token_time is not None or (landed and req.params.max_tokens > 1):
            # The tokens it has to come (a request behind its target makes its lack up over
            # them; one ahead may absorb a whole sample over them): up to ``max_tokens``, all
            # of them where no token it samples can end it (``ignore_eos`` and no stop ids,
            # as benchmark clients send requests), else no more than it produced so far,
            # since it may stop early. An abort (a client gone, a stop string the HTTP
            # server found in the text) is not foreseen.
            produced = len(req.output) - 1 + landed
            to_come = req.params.max_tokens - produced - 1
            if self._stop_tokens(req):
                to_come = min(to_come, produced + 1)
            first = now if req.first_token_time is None else req.first_token_time
            return produced, now - first, to_come
        # Prefill left after this iteration's chunk, at a full token budget per iteration.
        budget = self.max_num_batched_tokens
        return BeforeFirstToken(req.slo.ttft_s - (now - req.arrival_time),
                                -(-req.pending // budget))

    def _schedule_requests(self, queued_s: float = 0.0) -> list[tuple[Request, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        taken: set[str] = set()
        # Set at the first prefill chunk: what the decoding requests allow, and the prefill
        # tokens the TTFT targets need this iteration (spent by the chunks in queue order).
        limit = need = None

        def prefill(req: Request, n: int) -> int:
            """Tokens of ``req``'s chunk, at most ``n`` (decodes are never cut)."""
            nonlocal limit, need
            if n == 1 or not self.slo_prefill_chunks:
                return n
            if limit is None:
                limit = self._decoding_limit([r for r, _ in scheduled], queued_s)
                # An iteration takes at least its decodes, however short the limit.
                need = self._prefill_need(max(limit, self._predict_scheduled(scheduled)))
            first = all(k == 1 for _, k in scheduled)
            k = max(self._prefill_chunk(req, n, scheduled, limit, first), min(n, need))
            need = max(0, need - k)
            return k

        # Running requests: decodes (one pending token) first, then unfinished prefills.
        for req in sorted(self.running, key=lambda r: (r.pending > 1, r.arrival_index)):
            if budget == 0 or len(scheduled) == self.max_num_seqs:
                break
            if req not in self.running or req.done_sampling or not req.pending:
                continue  # preempted earlier in this loop, or waiting for its last token
            n = prefill(req, min(req.pending, budget))
            if n == 0:
                continue
            if not self._make_room(req, req.num_computed + n, taken):
                continue
            self.allocator.grow(req.request_id, req.num_computed + n)
            scheduled.append((req, n))
            taken.add(req.request_id)
            budget -= n
        # Waiting requests, oldest first, while budget, sequence slots and pages last. One
        # preempted with a token still in flight waits until the host has that token.
        while self.waiting and budget > 0 and len(scheduled) < self.max_num_seqs:
            req = self.waiting[0]
            if req.in_flight:
                break
            n = prefill(req, min(req.pending, budget))
            if n == 0 or not self.allocator.can_grow(req.request_id, n):
                break
            self.waiting.popleft()
            self.allocator.grow(req.request_id, n)
            self.running.append(req)
            scheduled.append((req, n))
            taken.add(req.request_id)
            budget -= n
        return scheduled

    def _decoding_limit(self, decoding: list[Request], queued_s: float) -> float:
        """Seconds the iteration's inference may take for the requests it decodes (inf when
        it decodes none): ``Policy.iteration_limit`` without its margins, the time that
        keeps each request's mean at its target. Prefill is inference, which must run
        anyway: it may spend the margins that keep finetuning's overruns from causing misses,
        but it is never planned to cause one. Their tokens of this iteration are not in
        flight yet."""
        if not decoding:
            return float("inf")
        now = time.monotonic() + queued_s
        limit = self.policy.iteration_limit([r.slo.tpot_s for r in decoding],
                                            [self._progress(r, now, set()) for r in decoding],
                                            margins=False)
        return float("inf") if limit is None else limit

    def _prefill_need(self, iteration_s: float) -> int:
        """Prefill tokens this iteration must run so that every request before its first
        token, in the order prefill serves them, can have it within ``safety`` of the time
        left to its TTFT target if each iteration from here takes ``iteration_s`` and
        prefills as many: the tokens ahead of a request and its own, over the iterations it
        has left. Pacing prefill this way keeps it at the rate arrivals need, where a fixed
        cut would let a queue build under load."""
        if not 0 < iteration_s < float("inf"):
            return 0  # no time limit, or no measured step time to pace by
        now = time.monotonic()
        prefilling = sorted((r for r in self.running if r.pending > 1 and not r.done_sampling),
                            key=lambda r: r.arrival_index)
        need = ahead = 0
        for req in itertools.chain(prefilling, self.waiting):
            ahead += req.pending
            left = self.policy.safety * (req.slo.ttft_s - (now - req.arrival_time))
            iterations = left / iteration_s
            need = max(need, ahead if iterations <= 1 else -(-ahead // int(iterations)))
        return need

    def _prefill_chunk(self, req: Request, n: int, scheduled: list[tuple[Request, int]],
                       limit: float, first: bool) -> int:
        """The largest prefill chunk of ``req``, at most ``n`` tokens, whose step beside
        ``scheduled`` the latency model says fits ``limit``. ``first`` (no prefill chunk
        scheduled yet): at least what fills the token bucket the decodes use, so prompts
        always advance. Uncut for a request that produced tokens before (a preempted one
        recomputing: its TPOT clock runs)."""
        if limit == float("inf") or req.output:
            return n
        used = sum(k for _, k in scheduled)

        def fits(k: int) -> bool:
            return self._predict_scheduled([*scheduled, (req, k)]) <= limit

        # Padding makes every chunk that ends inside a token bucket cost the same: the
        # chunks worth pricing fill one exactly.
        options = sorted({n, *(t - used for t in self.token_buckets if 0 < t - used < n)})
        fitting = [k for k in options if fits(k)]
        least = min(n, options[0]) if first else 0
        return max(fitting, default=least)

    def _predict_scheduled(self, scheduled: list[tuple[Request, int]]) -> float:
        """Predicted seconds of a step of these (request, tokens) chunks (0 for none)."""
        if not scheduled:
            return 0.0
        widest = max(self.allocator.pages_for(r.num_computed + k) for r, k in scheduled)
        return self._predict_shape(sum(k for _, k in scheduled), len(scheduled), widest, False,
                                   any(r.sorts_vocab for r, _ in scheduled))

    def _make_room(self, req: Request, num_tokens: int, taken: set[str]) -> bool:
        """Finetuning yields its pages first, then newer requests are preempted until ``req``
        can hold ``num_tokens``; False if req itself was preempted."""
        if (not self.allocator.can_grow(req.request_id, num_tokens)
                and self.trainer is not None and self.trainer.yield_pages()):
            self.finetune_yields += 1
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
        # A token in flight is the sequence's last: its id comes from the device.
        known = req.tokens[start:start + n]
        feed_row = -1
        if len(known) < n:
            known, feed_row = [*known, 0], req.feed_row
        return SeqChunk(
            token_ids=known, start_position=start,
            page_table=self.allocator.page_table(req.request_id), temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, seed=req.seed,
            sample_count=len(req.output) + req.in_flight,
            adapter_slot=-1 if self.registry is None else self.registry.slot_of(req.adapter),
            feed_row=feed_row,
        )

    # ----- 3. update ------------------------------------------------------------------------

    def update(self, plan: IterationPlan, next_tokens: np.ndarray,
               logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               ) -> list[RequestOutput]:
        """Applies a step's sampled tokens (``next_tokens[row]``; ``logprobs`` when someone
        asked) to the requests of ``plan``, matched by request id; returns the outputs of
        those that advanced. Rows of requests aborted or finished since are dropped."""
        outputs = []
        for row, scheduled in enumerate(plan.rows):
            req = scheduled.request
            if not scheduled.samples:
                continue  # mid-prefill: the sampled token is not the sequence's next one
            req.in_flight -= 1
            if req.finish_reason is not None or self.requests.get(req.request_id) is not req:
                continue  # aborted, or stopped on an earlier token
            token = int(next_tokens[row])
            out = self._append(req, token, _row_logprobs(logprobs, row, req.params))
            outputs.append(out)
        return outputs

    def _stop_tokens(self, req: Request) -> set[int]:
        """The sampled tokens that end ``req``: its stop token ids, and the model's EOS
        tokens unless it ignores them (none: only ``max_tokens`` ends it)."""
        stop = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stop.update(self.eos_token_ids)
        return stop

    def _append(self, req: Request, token: int,
                logprobs: tuple[float, list[tuple[int, float]]] | None) -> RequestOutput:
        req.output.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if token in self._stop_tokens(req):
            req.finish_reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            req.finish_reason = "length"
        metrics = None
        if req.finish_reason is not None:
            if req in self.running:
                self.running.remove(req)
            else:  # preempted while its last token was in flight
                self.waiting.remove(req)
            self.allocator.free(req.request_id)
            del self.requests[req.request_id]
            metrics = RequestMetrics(req.arrival_time, req.first_token_time, time.monotonic(),
                                     len(req.prompt), len(req.output), req.slo)
            self.finished.append(metrics)
        return RequestOutput(req.request_id, [token], list(req.output),
                             req.finish_reason is not None, req.finish_reason, metrics,
                             None if logprobs is None else [logprobs[0]],
                             None if logprobs is None else [logprobs[1]])


def _row_logprobs(logprobs, row: int, params: SamplingParams
                  ) -> tuple[float, list[tuple[int, float]]] | None:
    """Row ``row``'s (sampled token's logprob, top ``params.logprobs`` pairs), if asked for."""
    if logprobs is None or params.logprobs is None:
        return None
    sampled, top, top_ids = logprobs
    n = params.logprobs
    return float(sampled[row]), [(int(t), float(v)) for t, v in zip(top_ids[row, :n],
                                                                     top[row, :n], strict=True)]
