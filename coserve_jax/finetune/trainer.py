"""Host side of token-level finetuning: jobs, sequences in flight, pieces, optimizer steps.

A job trains one sequence at a time. The sequence's forward goes in windows
that the engine adds to its ragged batch after the inference tokens; their K/V
go into paged KV so later windows attend to earlier ones, and each layer's input
is saved in the activation store. When the last window is done its pages are
freed and backward pieces (``backward_layers`` layers over the whole sequence,
from the top) run one per iteration. After the piece that reaches layer 0 the
sequence's LoRA gradients are complete; after ``sequences_per_step`` sequences
the job takes an optimizer step and writes the new weights into its adapter
slot, so inference requests naming the job see them at once.

The trainer is host bookkeeping: every device change (a backward piece, a whole
sample, a job's creation, optimizer step, checkpoint) is a command it hands the
engine's ``Runner``, which owns the buffers, the slots and the jobs' weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import jax
import numpy as np

from coserve_jax.batch import SeqChunk, powers_of_two
from coserve_jax.config import ModelConfig
from coserve_jax.errors import AlreadyExists, InUse, InvalidRequest
from coserve_jax.finetune.data import TrainSequence, labels_and_weights
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.kv_cache import PageAllocator
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.slots import AdapterRegistry
from coserve_jax.runner import Runner
from coserve_jax.runner_commands import (
    ApplyUpdate,
    DropJob,
    DropSampleParts,
    GatherJob,
    RestoreJob,
    RunBackwardPiece,
    RunSamplePart,
    RunWholeSample,
    SaveJob,
    StartJob,
)
from coserve_jax.step import BackwardPiece

log = logging.getLogger(__name__)

PieceShape = tuple[int, int, int]
"""(sequence bucket, layers, token block) of a backward piece; the block equals the bucket
for whole-sequence pieces."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Capacity and granularity of finetuning inside the engine."""

    max_seqs: int
    """Training sequences in flight at once (rows of the activation store)."""
    max_len: int
    """Longest training sequence (tokens)."""
    window: int
    """Forward-window tokens per sequence per iteration at most."""
    backward_layers: int
    """Layers per backward piece (must divide the model's layers)."""
    min_seq_bucket: int = 16
    """Smallest sequence-length bucket of the backward piece."""
    attention_block: int = 256
    """Queries per attention block in backward pieces (bounds their attention memory)."""
    block: int = 0
    """Tokens per backward piece for sequences longer than this (one layer, a token block
    at a time: ``step.backward_block_fn``); 0 keeps every piece over the whole sequence."""
    keep_projections: bool = False
    """Save every projection's output in the forward for the backward pieces
    (``FinetuneConfig.keep_projections``)."""
    sample_segments: int = 4
    """Segments of layers of a sample run in parts (``FinetuneConfig.sample_segments``)."""


@dataclasses.dataclass
class InFlight:
    """A training sequence between its first forward window and its last backward piece."""

    job: JobRun
    seq: TrainSequence
    labels: np.ndarray
    weights: np.ndarray
    act_slot: int
    kv_id: tuple
    forwarded: int = 0
    layers_left: int = 0  # layers still to backpropagate (0 while forwarding)
    rows_left: int = 0  # token-block pieces: rows of the current layer still to pull back
    loss_parts: list = dataclasses.field(default_factory=list)
    """(a step's ``seq_loss`` device array, row) of each forward window, read when the
    job's losses are."""

    @property
    def length(self) -> int:
        return len(self.seq.tokens)


@dataclasses.dataclass
class WholeSample:
    """A training sample run whole, or in parts (``Trainer.run_sample_part``), padded to its
    length bucket."""

    run: JobRun
    length: int
    tokens: np.ndarray  # [bucket] int32
    labels: np.ndarray  # [bucket] int32
    weights: np.ndarray  # [bucket] float32, 0 on padding
    next_part: int = 0
    loss: jax.Array | None = None  # the sample's weighted loss, from its top part


LossParts = list[tuple[jax.Array, int | None]]
"""A sequence's weighted loss as the device values it sums: (array, row) of each forward
window's ``seq_loss``, or (scalar, None) of a whole sample."""


class PendingLoss:
    """An optimizer step's mean sequence loss, kept as device values until it is read, so
    that finishing a sequence never waits for the device (the overlapped loop has the next
    step queued behind it)."""

    def __init__(self, sequences: list[LossParts]):
        self.sequences = sequences

    def ready(self) -> bool:
        """Every step it reads from has finished (reading it will not wait)."""
        return all(a.is_ready() for parts in self.sequences for a, _ in parts)

    def total(self) -> float:
        """The sequences' summed loss (waits for the steps it reads from)."""
        total = 0.0
        for parts in self.sequences:
            total += float(sum(np.asarray(a) if row is None else np.asarray(a)[row]
                               for a, row in parts))
        return total

    def value(self) -> float:
        """The mean sequence loss (waits for the steps it reads from)."""
        return self.total() / len(self.sequences)


@dataclasses.dataclass(frozen=True)
class Window:
    """A proposed forward window: ``n`` tokens from position ``start`` of sequence ``seq``
    (None: the next sequence ``run`` would start)."""

    run: JobRun
    seq: InFlight | None
    start: int
    n: int
    pages: int
    """KV pages the sequence's page table holds after the window (its width)."""


class JobRun:
    """A job's host state: its slot, data position, counters and sequences in flight (its
    weights and optimizer state live in the runner, under the job's name)."""

    def __init__(self, spec: FinetuneJob, slot: int):
        self.spec = spec
        self.slot = slot
        self.state = "running"
        self.error: str | None = None
        self.step = 0
        self.seqs_started = 0  # global sequence counter over epochs
        self.seqs_done = 0
        self.seqs_in_step = 0
        self.loss_parts_in_step: list[LossParts] = []
        self._losses: list[float | PendingLoss] = []
        self._grad_norm = None  # a device scalar until read
        self.tokens_trained = 0
        self.tokens_scheduled = 0
        self.started = time.monotonic()
        self.inflight: list[InFlight] = []  # sequences of the current optimizer step
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)
        n = len(spec.dataset)
        self.total_seqs = (spec.max_steps * spec.sequences_per_step if spec.max_steps
                           else spec.epochs * n)

    @property
    def losses(self) -> list[float]:
        """Mean sequence loss of each optimizer step (read from the device when asked)."""
        self.settle_losses(wait=True)
        return self._losses

    def settle_losses(self, wait: bool) -> None:
        """Turns the pending losses at the end of ``losses`` into floats, oldest first,
        stopping at one the device has not produced yet unless ``wait``."""
        first = len(self._losses)
        while first and isinstance(self._losses[first - 1], PendingLoss):
            first -= 1
        for i in range(first, len(self._losses)):
            if not wait and not self._losses[i].ready():
                return
            self._losses[i] = self._losses[i].value()

    @property
    def loss_in_step(self) -> float:
        """Summed loss of the sequences done in the current optimizer step (waits for them)."""
        return PendingLoss(self.loss_parts_in_step).total()

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (read from the device once)."""
        if self._grad_norm is not None and not isinstance(self._grad_norm, float):
            self._grad_norm = float(self._grad_norm)
        return self._grad_norm

    def seqs_for_step(self, step: int) -> int:
        return min(self.spec.sequences_per_step,
                   self.total_seqs - step * self.spec.sequences_per_step)

    @property
    def unstarted_in_step(self) -> int:
        """Sequences of the current optimizer step not yet started (the next step's
        sequences wait for this step's update)."""
        step_end = min(self.total_seqs, (self.step + 1) * self.spec.sequences_per_step)
        return max(0, step_end - self.seqs_started)

    def upcoming(self, k: int) -> TrainSequence:
        """The sequence the ``k``-th next call of ``next_sequence`` returns (0: the next)."""
        epoch, index = divmod(self.seqs_started + k, len(self.spec.dataset))
        return self.spec.dataset[int(self._order(epoch)[index])]

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:  # one epoch's permutation, kept while it is used
            self._epoch_order = (epoch, self.spec.dataset.order(epoch, self.spec.seed))
        return self._epoch_order[1]

    def next_sequence(self) -> TrainSequence | None:
        """The next sequence of the current optimizer step, or None if all have started."""
        if not self.unstarted_in_step:
            return None
        seq = self.upcoming(0)
        self.seqs_started += 1
        return seq

    def learning_rate(self, step: int) -> float:
        """The schedule's learning rate at optimizer step ``step``."""
        return float(self.spec.optimizer.schedule_fn(self.spec.total_steps)(step))

    def tokens_per_s(self) -> float:
        """Tokens trained per second since the job started."""
        return self.tokens_trained / max(time.monotonic() - self.started, 1e-9)

    def progress(self) -> JobProgress:
        return JobProgress(
            name=self.spec.name, state=self.state, step=self.step,
            total_steps=self.spec.total_steps, loss=self.losses[-1] if self.losses else None,
            losses=list(self.losses), learning_rate=self.learning_rate(self.step),
            grad_norm=self.grad_norm, tokens_trained=self.tokens_trained,
            tokens_per_s=self.tokens_per_s(),
            epoch=self.seqs_done // len(self.spec.dataset), error=self.error)

    def meta(self) -> dict:
        # Sequences of a partly done step live only in the gradient accumulators, which
        # are not saved: a resumed job restarts from the last step boundary.
        boundary = min(self.total_seqs, self.step * self.spec.sequences_per_step)
        return {"step": self.step, "seqs_done": boundary, "losses": self.losses,
                "tokens_trained": self.tokens_trained, "seed": self.spec.seed,
                "name": self.spec.name}

    def restore(self, meta: dict) -> None:
        """Takes up the data position and counters of a restored checkpoint."""
        self.step = int(meta["step"])
        self.seqs_done = self.seqs_started = int(meta["seqs_done"])
        self._losses = [float(x) for x in meta["losses"]]
        self.tokens_trained = int(meta["tokens_trained"])
        log.info("job %s resumed at step %d", self.spec.name, self.step)


def train_seq_buckets(config: TrainerConfig) -> tuple[int, ...]:
    """Sequence-length buckets of the backward pieces and whole samples; validates
    ``config.block`` (a power of two >= 2, or 0)."""
    if config.block and (config.block & (config.block - 1) or config.block < 2):
        raise ValueError(f"backward_block ({config.block}) must be a power of two >= 2 "
                         f"(or 0 for whole-sequence pieces)")
    return powers_of_two(min(config.min_seq_bucket, config.max_len), config.max_len)


class Trainer:
    """Runs every finetuning job of one engine."""

    def __init__(self, cfg: ModelConfig, registry: AdapterRegistry, allocator: PageAllocator,
                 config: TrainerConfig, runner: Runner):
        """``runner`` owns the finetuning buffers (``runner.train``) and executes the
        trainer's device commands."""
        if cfg.num_layers % config.backward_layers:
            raise ValueError(f"backward_layers ({config.backward_layers}) must divide the "
                             f"model's {cfg.num_layers} layers")
        self.cfg = cfg
        self.registry = registry
        self.allocator = allocator
        self.config = config
        self.runner = runner
        self.seq_buckets = train_seq_buckets(config)
        self.jobs: dict[str, JobRun] = {}
        self.writer = None  # a telemetry.ScalarWriter, set by the engine
        self._scalars_due: list[tuple] = []
        """(run, step, PendingLoss, grad norm array, tokens/s) of optimizer steps whose
        scalars are not yet written (``write_scalars``)."""
        self._free_act = list(range(config.max_seqs - 1, -1, -1))
        self._kv_ids = 0
        self._in_parts: WholeSample | None = None  # a sample run in parts, under way

    # ----- jobs -----------------------------------------------------------------------------

    def submit(self, spec: FinetuneJob) -> JobProgress:
        """Validates a job, gives it an adapter slot, resumes it from its checkpoint if any."""
        if spec.name in self.jobs or spec.name in self.registry.names():
            raise AlreadyExists(f"an adapter or job named {spec.name!r} already exists")
        longest = max(len(s.tokens) for s in spec.dataset)
        if longest > self.config.max_len:
            raise InvalidRequest(f"job {spec.name!r} has a sequence of {longest} tokens; the "
                                 f"engine trains at most {self.config.max_len} "
                                 "(EngineConfig.max_train_len)")
        adapter = LoraAdapter.zeros_b(spec.name, spec.lora, self.cfg, spec.seed)
        self.registry.check_loadable(adapter)
        slot = self.registry.load(adapter)
        self.runner.execute(StartJob(
            spec.name, spec.optimizer, spec.total_steps, spec.lora.r, spec.lora.target_modules,
            {m: np.asarray(adapter.a[m]) for m in spec.lora.target_modules},
            {m: np.asarray(adapter.b[m]) for m in spec.lora.target_modules},
            spec.checkpoint_dir))
        run = JobRun(spec, slot)
        self.jobs[spec.name] = run
        meta = self.runner.execute(RestoreJob(spec.name))
        if meta is not None:
            run.restore(meta)
            self._publish(run)
            if run.step >= spec.total_steps:
                self._finish(run)
        return run.progress()

    def cancel(self, name: str) -> None:
        run = self.jobs[name]
        if run.state == "running":
            self._drop_inflight(run)
            run.state = "cancelled"

    def checkpoint(self, name: str) -> int | None:
        """Saves a running job now (its last optimizer step); the step saved, or None if
        the job has no checkpoint directory or is not running."""
        run = self.jobs[name]
        checkpointer = self.runner.jobs[name].checkpointer
        if checkpointer is None or run.state != "running":
            return None
        if checkpointer.latest_step() != run.step:
            self.runner.execute(SaveJob(name, run.step, run.meta()))
        return run.step

    def remove(self, name: str) -> None:
        """Forgets a job that is no longer running and frees its adapter slot."""
        run = self.jobs[name]
        if run.state == "running":
            raise InUse(f"job {name!r} is running; cancel it first")
        del self.jobs[name]
        self.runner.execute(DropJob(name))
        self.registry.unload(name)

    def _fail(self, run: JobRun, error: Exception) -> None:
        """One job's failure (say, its checkpoint directory is unwritable) ends that job
        only; the engine and the other jobs go on."""
        log.error("job %s failed: %s", run.spec.name, error)
        self._drop_inflight(run)
        run.state, run.error = "failed", f"{type(error).__name__}: {error}"

    def has_work(self) -> bool:
        return any(r.state == "running" for r in self.jobs.values())

    def has_forward_work(self) -> bool:
        """Some running job has a window to run now (or a sequence it could start)."""
        for run in self.jobs.values():
            if run.state != "running":
                continue
            if any(f.forwarded < f.length for f in run.inflight):
                return True
            if self._free_act and run.unstarted_in_step:
                return True
        return False

    def _ready_pieces(self) -> list[InFlight]:
        return [f for r in self.jobs.values() if r.state == "running"
                for f in r.inflight if f.layers_left]

    def next_piece_shape(self, fits: Callable[[PieceShape], bool] | None = None,
                         ) -> PieceShape | None:
        """(sequence bucket, layers, token block) of the piece ``run_backward_piece(fits)``
        would run next; None when no piece is ready (or none ``fits``)."""
        f = self._pick_piece(fits)
        return None if f is None else self._piece_shape(f)

    def _piece_shape(self, f: InFlight) -> PieceShape:
        return self._shape_of(self._seq_bucket(f.length))

    def _shape_of(self, seq_len: int) -> PieceShape:
        """Pieces of sequences in bucket ``seq_len``: whole-sequence pieces of
        ``backward_layers`` layers, or one layer a token block at a time."""
        block = self.config.block
        if block and seq_len > block:
            return seq_len, 1, block
        return seq_len, self.config.backward_layers, seq_len

    def _pick_piece(self, fits: Callable[[PieceShape], bool] | None) -> InFlight | None:
        """The ready sequence furthest along whose next piece ``fits`` (any, without
        ``fits``): when the furthest one's piece is too long for the time left, a shorter
        sequence's piece can still use that time."""
        for f in sorted(self._ready_pieces(), key=lambda x: x.layers_left):
            if fits is None or fits(self._piece_shape(f)):
                return f
        return None

    def _seq_bucket(self, length: int) -> int:
        return next(b for b in self.seq_buckets if b >= length)

    def yield_pages(self) -> int:
        """Frees the KV pages of every sequence still in its forward (to restart later), so
        inference can have them; returns how many sequences yielded."""
        n = 0
        for run in self.jobs.values():
            for f in run.inflight:
                if f.forwarded and f.forwarded < f.length:
                    self.allocator.free(f.kv_id)
                    run.tokens_scheduled -= f.forwarded
                    f.forwarded, f.loss_parts = 0, []
                    n += 1
        return n

    # ----- forward windows ------------------------------------------------------------------

    def propose_windows(self, budget: int, max_seqs: int, start_new: bool = True,
                        max_new: int | None = None) -> list[Window]:
        """The forward windows of training sequences this iteration could run, within
        ``budget`` tokens, ``max_seqs`` sequences and the free KV pages, without changing
        anything: the scheduler prices proposals, then ``commit_windows`` runs the one it
        picks. Jobs furthest behind their share go first; each job continues the
        sequences it is forwarding, then (``start_new``) starts new ones of its current
        optimizer step, ``max_new`` at most in all (None: as many as fit).
        Windows grow a sequence's page table only up to their own end, so early windows
        of long sequences stay in narrow (cheap) buckets."""
        out: list[Window] = []
        free_pages = self.allocator.usage().free_pages
        free_act = len(self._free_act)
        new_left = math.inf if max_new is None else max_new
        for run in sorted((r for r in self.jobs.values() if r.state == "running"),
                          key=lambda r: r.tokens_scheduled / r.spec.weight):
            forwarding = [f for f in run.inflight if f.forwarded < f.length]
            started = 0
            while budget > 0 and len(out) < max_seqs:
                if forwarding:
                    f = forwarding.pop(0)
                    start, length, seq = f.forwarded, f.length, f
                    have = len(self.allocator.page_table(f.kv_id)) if f.forwarded else 0
                else:
                    if (not start_new or not free_act or not new_left
                            or started == run.unstarted_in_step):
                        break
                    start, length, seq, have = 0, len(run.upcoming(started).tokens), None, 0
                n = min(self.config.window, length - start, budget)
                pages = self.allocator.pages_for(start + n)
                if pages - have > free_pages:
                    break  # finetuning yields: inference keeps the pages
                if seq is None:
                    started += 1
                    free_act -= 1
                    new_left -= 1
                free_pages -= pages - have
                out.append(Window(run, seq, start, n, pages))
                budget -= n
        return out

    def commit_windows(self, windows: list[Window]) -> list[tuple[InFlight, SeqChunk]]:
        """Runs the proposal of ``propose_windows`` made against the current state: starts
        its new sequences, grows their pages and books the tokens. Returns each window's
        sequence and batch chunk, in order."""
        out, done = [], []
        for w in windows:
            f = w.seq if w.seq is not None else self._start_sequence(w.run)
            table = self.allocator.grow(f.kv_id, w.start + w.n)
            sl = slice(w.start, w.start + w.n)
            out.append((f, SeqChunk(
                token_ids=list(f.seq.tokens[sl]), start_position=w.start, page_table=table,
                adapter_slot=w.run.slot, labels=f.labels[sl], loss_weights=f.weights[sl],
                act_base=f.act_slot * self.config.max_len)))
            w.run.tokens_scheduled += w.n
            f.forwarded += w.n
            if f.forwarded == f.length:  # ready for its backward, which reads no KV
                f.layers_left, f.rows_left = self.cfg.num_layers, f.length
                done.append(f.kv_id)
        # Pages of finished forwards go only now: this step still writes them, so no other
        # window of the same step may be given them (a later step may: it runs after).
        for kv_id in done:
            self.allocator.free(kv_id)
        return out

    def forward_windows(self, budget: int, max_seqs: int) -> list[tuple[InFlight, SeqChunk]]:
        """``commit_windows(propose_windows(budget, max_seqs))``."""
        return self.commit_windows(self.propose_windows(budget, max_seqs))

    def _start_sequence(self, run: JobRun) -> InFlight:
        seq = run.next_sequence()
        labels, weights = labels_and_weights(seq)
        self._kv_ids += 1
        f = InFlight(run, seq, labels, weights, self._free_act.pop(),
                     ("train", run.spec.name, self._kv_ids))
        run.inflight.append(f)
        return f

    def attach_losses(self, windows: list[tuple[InFlight, SeqChunk]], seq_loss: jax.Array,
                      first_row: int) -> None:
        """Books the step output holding each window's loss (row ``first_row + i`` of
        ``seq_loss``); it is read from the device only when the sequence completes."""
        for i, (f, _) in enumerate(windows):
            f.loss_parts.append((seq_loss, first_row + i))

    # ----- backward pieces ------------------------------------------------------------------

    def warmup(self, progress: bool = True, repeats: int = 1,
               skip: Callable[[PieceShape], bool] = lambda shape: False,
               ) -> dict[PieceShape, float]:
        """Compiles the backward piece of every sequence bucket (but those whose shape the
        caller says to ``skip``) and times it; returns ``{(seq_len, layers, block): median
        seconds after the first run}``. A zero-length piece changes nothing (every row is
        masked) but costs the same as a full one."""
        from tqdm.auto import tqdm

        times = {}
        for seq_len in tqdm(self.seq_buckets, desc="compiling backward", disable=not progress):
            shape = self._shape_of(seq_len)
            if skip(shape):
                continue
            # The last block of layer 0 of an empty sequence: nothing to pull back.
            empty = BackwardPiece(act_row=np.int32(0), layer_start=np.int32(0),
                                  length=np.int32(0), adapter_slot=np.int32(0),
                                  block_start=np.int32(0))

            def run(empty=empty, shape=shape):
                self.runner.execute(RunBackwardPiece(empty, *shape))
                return self.runner.train.grads_h

            times[shape] = _median_seconds(run, repeats)
        return times

    def run_backward_piece(self, fits: Callable[[PieceShape], bool] | None = None) -> bool:
        """Runs one backward piece of the sequence furthest along (among those whose piece
        ``fits``, see ``next_piece_shape``); False if none is ready.

        A whole-sequence piece covers ``backward_layers`` layers; a token-block piece one
        block of the current layer, last block first."""
        f = self._pick_piece(fits)
        if f is None:
            return False
        shape = self._piece_shape(f)
        seq_len, layers, block = shape
        layer = f.layers_left - layers
        first_row = (f.rows_left - 1) // block * block if block < seq_len else 0
        piece = BackwardPiece(
            act_row=np.int32(f.act_slot * self.config.max_len), layer_start=np.int32(layer),
            length=np.int32(f.length), adapter_slot=np.int32(f.job.slot),
            block_start=np.int32(first_row))
        self.runner.execute(RunBackwardPiece(piece, *shape))
        f.rows_left = first_row
        if first_row == 0:  # the layers are done; the next piece starts below them
            f.layers_left, f.rows_left = layer, f.length
        if f.layers_left == 0:
            self._sequence_done(f)
        return True

    def _sequence_done(self, f: InFlight) -> None:
        f.job.inflight.remove(f)
        self._free_act.append(f.act_slot)
        self._book_sequence(f.job, f.loss_parts, f.length)

    def _book_sequence(self, run: JobRun, loss: LossParts, length: int) -> None:
        """A sequence's gradients are complete: count it, and step the optimizer when it
        was the last sequence of the step."""
        run.seqs_done += 1
        run.seqs_in_step += 1
        run.loss_parts_in_step.append(loss)
        run.tokens_trained += length
        if run.seqs_in_step == run.seqs_for_step(run.step):
            self._optimizer_step(run)

    # ----- whole samples (temporal-seq baselines) -------------------------------------------

    def has_inflight(self) -> bool:
        """Some running job has a sequence between its first window and its last piece."""
        return any(r.state == "running" and r.inflight for r in self.jobs.values())

    def has_sample_work(self) -> bool:
        """Some running job has a sample of its current optimizer step left to run whole, or
        a sample run in parts is under way."""
        return self._in_parts is not None or any(
            r.state == "running" and r.unstarted_in_step for r in self.jobs.values())

    def warmup_samples(self, progress: bool = True, repeats: int = 1,
                       skip: Callable[[int], bool] = lambda n: False) -> dict[int, float]:
        """Compiles the whole-sample program for every length bucket (but those the caller
        says to ``skip``) and times it; returns ``{length bucket: median seconds after the
        first run}`` (zero weights: no change)."""
        from tqdm.auto import tqdm

        times = {}
        for n in tqdm(self.seq_buckets, desc="compiling samples", disable=not progress):
            if skip(n):
                continue
            def run(n=n):
                zeros = np.zeros(n, np.int32)
                return self.runner.execute(RunWholeSample(zeros, zeros,
                                                          np.zeros(n, np.float32), 0))

            times[n] = _median_seconds(run, repeats)
        return times

    def warmup_sample_parts(self, progress: bool = True, repeats: int = 1,
                            skip: Callable[[int], bool] = lambda n: False
                            ) -> dict[int, list[float]]:
        """Compiles the programs of a sample run in parts for every length bucket (but those
        the caller says to ``skip``) and times them; returns ``{length bucket: [median
        seconds of each part after the first round]}`` (zero weights: no change)."""
        from tqdm.auto import tqdm

        times = {}
        for n in tqdm(self.seq_buckets, desc="compiling sample parts", disable=not progress):
            if skip(n):
                continue
            zeros = np.zeros(n, np.int32)
            rounds = []
            for _ in range(max(repeats, 1)):
                seconds = []
                for index in range(self.sample_parts):
                    t0 = time.perf_counter()
                    self.runner.execute(RunSamplePart(zeros, zeros, np.zeros(n, np.float32), 0,
                                                      index, self.sample_parts))
                    jax.block_until_ready((self.runner.train.grad_a, self.runner.sample_part_h))
                    seconds.append(time.perf_counter() - t0)
                rounds.append(seconds)
            times[n] = np.median(np.asarray(rounds[1:] or rounds), axis=0).tolist()
        return times

    def _next_sample_run(self) -> JobRun | None:
        """The job whose sample ``run_whole_sample`` runs next: the furthest behind its share."""
        runs = [r for r in self.jobs.values() if r.state == "running" and r.unstarted_in_step]
        return min(runs, key=lambda r: r.tokens_scheduled / r.spec.weight, default=None)

    def next_sample_bucket(self) -> int | None:
        """The length bucket of the sample ``run_whole_sample`` would run (None: none)."""
        run = self._next_sample_run()
        return None if run is None else self._seq_bucket(len(run.upcoming(0).tokens))

    def pieces_per_sequence(self, seq_len: int) -> tuple[PieceShape, int]:
        """The backward pieces a sequence in bucket ``seq_len`` takes on the token-level
        path: their shape and how many."""
        shape = self._shape_of(seq_len)
        n, layers, block = shape
        return shape, -(-self.cfg.num_layers // layers) * -(-n // block)

    def run_whole_sample(self) -> int:
        """Runs the next sample of the job furthest behind its share, whole: its forward over
        all tokens and its backward through every layer in one program, as a standard
        trainer does (``temporal-seq``). Returns its tokens, 0 if no job has one ready."""
        sample = self._start_sample()
        if sample is None:
            return 0
        loss = self.runner.execute(RunWholeSample(sample.tokens, sample.labels,
                                                  sample.weights, sample.run.slot))
        self._book_sequence(sample.run, [(loss, None)], sample.length)
        return sample.length

    @property
    def sample_parts(self) -> int:
        """Parts of a sample run in parts: 2K - 1 over K segments (1: whole samples only)."""
        return 2 * min(self.config.sample_segments, self.cfg.num_layers) - 1

    def next_sample_part(self) -> tuple[int, int] | None:
        """(length bucket, part index) of the part ``run_sample_part`` would run next: of the
        sample in parts under way, else the first of the next sample (None: no sample)."""
        if self._in_parts is not None:
            return len(self._in_parts.tokens), self._in_parts.next_part
        bucket = self.next_sample_bucket()
        return None if bucket is None else (bucket, 0)

    def sample_in_parts(self) -> bool:
        """A sample run in parts is under way (its next part runs before any other sample)."""
        return self._in_parts is not None

    def run_sample_part(self) -> int:
        """Runs the next part of the sample in parts under way, or the first part of the
        next sample (the one ``run_whole_sample`` would run): the same gradients as
        the whole sample, in ``sample_parts`` programs (``runner_commands.RunSamplePart``).
        Returns the sample's tokens after its last part, else 0."""
        if self._in_parts is None:
            if self.sample_parts < 2:
                raise ValueError("sample_segments is 1: samples run whole only")
            self._in_parts = self._start_sample()
            if self._in_parts is None:
                return 0
        sample, count = self._in_parts, self.sample_parts
        loss = self.runner.execute(RunSamplePart(sample.tokens, sample.labels, sample.weights,
                                                 sample.run.slot, sample.next_part, count))
        if loss is not None:
            sample.loss = loss
        sample.next_part += 1
        if sample.next_part < count:
            return 0
        self._in_parts = None
        self._book_sequence(sample.run, [(sample.loss, None)], sample.length)
        return sample.length

    def _start_sample(self) -> WholeSample | None:
        """Starts the next sample of the job furthest behind its share, padded to its bucket."""
        run = self._next_sample_run()
        if run is None:
            return None
        seq = run.next_sequence()
        labels, weights = labels_and_weights(seq)
        length = len(seq.tokens)
        pad = self._seq_bucket(length) - length
        run.tokens_scheduled += length
        return WholeSample(run, length, np.pad(np.asarray(seq.tokens, np.int32), (0, pad)),
                           np.pad(labels, (0, pad)).astype(np.int32),
                           np.pad(weights, (0, pad)))

    def _optimizer_step(self, run: JobRun) -> None:
        n = run.seqs_in_step
        assert n == len(run.loss_parts_in_step)
        grad_norm = self.runner.execute(ApplyUpdate(run.spec.name, run.slot, n,
                                                    float(run.spec.lora.scale)))
        loss = PendingLoss(run.loss_parts_in_step)
        run._grad_norm = grad_norm
        run.settle_losses(wait=False)  # what stays pending holds device buffers
        run._losses.append(loss)
        run.step += 1
        if self.writer is not None:
            self._scalars_due.append((run, run.step, loss, grad_norm, run.tokens_per_s()))
        run.seqs_in_step, run.loss_parts_in_step = 0, []
        every = run.spec.checkpoint_every
        done = run.step >= run.spec.total_steps
        try:
            saves = self.runner.jobs[run.spec.name].checkpointer is not None
            if saves and (done or (every and run.step % every == 0)):
                self.runner.execute(SaveJob(run.spec.name, run.step, run.meta()))
            if done:
                self._finish(run)
        except OSError as e:
            self._fail(run, e)

    def write_scalars(self, wait: bool = False) -> None:
        """Writes the TensorBoard scalars of the optimizer steps taken so far, in order,
        stopping at the first whose loss or gradient norm the device has not produced yet
        (``wait``: waits for them all), so that the loop never waits for the device to log."""
        while self._scalars_due:
            run, step, loss, grad_norm, tokens_per_s = self._scalars_due[0]
            if not wait and not (loss.ready() and grad_norm.is_ready()):
                return
            self._scalars_due.pop(0)
            self.writer.scalars(f"jobs/{run.spec.name}", {
                "loss": loss.value(), "learning_rate": run.learning_rate(step),
                "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s}, step)

    def _finish(self, run: JobRun) -> None:
        run.state = "completed"
        if run.spec.export_dir:
            from coserve_jax.lora.peft_io import save_adapter

            adapter = self.adapter_of(run)  # every process (a multi-host gather) ...
            if jax.process_index() == 0:  # ... but one writes the files
                save_adapter(adapter, run.spec.export_dir)

    def _publish(self, run: JobRun) -> None:
        """Writes the job's current weights into its slot (after a restore)."""
        self.registry.write(run.slot, self.adapter_of(run))

    def adapter_of(self, run: JobRun) -> LoraAdapter:
        """The job's latest weights as a ``LoraAdapter`` (host copy)."""
        host = self.runner.execute(GatherJob(run.spec.name))
        return LoraAdapter(run.spec.name, run.spec.lora,
                           {m: p["a"] for m, p in host.items()},
                           {m: p["b"] for m, p in host.items()})

    def _drop_inflight(self, run: JobRun) -> None:
        if self._in_parts is not None and self._in_parts.run is run:
            self.runner.execute(DropSampleParts())
            self._in_parts = None
            run.seqs_started -= 1
        for f in run.inflight:
            self.allocator.free(f.kv_id)
            self._free_act.append(f.act_slot)
            run.seqs_started -= 1
        run.inflight = []


def _median_seconds(run: Callable[[], jax.Array], repeats: int) -> float:
    """Median wall time of ``run()`` (waited for) over ``repeats`` calls, the first (which
    compiles) left out when there are more."""
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:] or times))

