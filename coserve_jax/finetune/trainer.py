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
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.batch import SeqChunk, powers_of_two
from coserve_jax.config import ModelConfig
from coserve_jax.errors import AlreadyExists, InUse, InvalidRequest
from coserve_jax.finetune.buffers import TrainBuffers
from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.finetune.data import TrainSequence, labels_and_weights
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.kv_cache import PageAllocator
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.slots import AdapterRegistry
from coserve_jax.step import (
    BackwardPiece,
    build_backward_block,
    build_backward_piece,
    build_sample_grads,
)
from pallas_kernels.dispatch import Kernels

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
    loss: float = 0.0

    @property
    def length(self) -> int:
        return len(self.seq.tokens)


class JobRun:
    """A job's live state: adapter weights, optimizer state, data position, counters."""

    def __init__(self, spec: FinetuneJob, slot: int, adapter: LoraAdapter, table_modules,
                 layout=None):
        self.spec = spec
        self.slot = slot
        self.state = "running"
        self.error: str | None = None
        self.tx = spec.optimizer.build(spec.total_steps)
        if layout is None:
            self.params = {m: {"a": jnp.asarray(adapter.a[m]), "b": jnp.asarray(adapter.b[m])}
                           for m in spec.lora.target_modules}
            self.opt_state = self.tx.init(self.params)
        else:  # weights and optimizer state take the layout of the slots they feed
            self.params = layout.put({m: {"a": adapter.a[m], "b": adapter.b[m]}
                                      for m in spec.lora.target_modules})
            self.opt_state = layout.jit_state(self.tx.init)(self.params)
        self.step = 0
        self.seqs_started = 0  # global sequence counter over epochs
        self.seqs_done = 0
        self.seqs_in_step = 0
        self.loss_in_step = 0.0
        self.losses: list[float] = []
        self.grad_norm: float | None = None
        self.tokens_trained = 0
        self.tokens_scheduled = 0
        self.started = time.monotonic()
        self.inflight: list[InFlight] = []  # sequences of the current optimizer step
        n = len(spec.dataset)
        self.total_seqs = (spec.max_steps * spec.sequences_per_step if spec.max_steps
                           else spec.epochs * n)
        if layout is None:  # shared by jobs of the same shape and optimizer: compiled once
            self._apply = _jitted_update(spec.optimizer, spec.total_steps, spec.lora.r,
                                         tuple(table_modules), spec.lora.target_modules)
        else:
            apply = functools.partial(_apply_update, self.tx, spec.lora.r,
                                      tuple(table_modules), spec.lora.target_modules)
            self._apply = layout.jit_state(apply, donate_argnums=(0, 1, 2))
        self.checkpointer = (JobCheckpointer(spec.checkpoint_dir) if spec.checkpoint_dir
                             else None)

    def seqs_for_step(self, step: int) -> int:
        return min(self.spec.sequences_per_step,
                   self.total_seqs - step * self.spec.sequences_per_step)

    @property
    def unstarted_in_step(self) -> int:
        """Sequences of the current optimizer step not yet started (the next step's
        sequences wait for this step's update)."""
        step_end = min(self.total_seqs, (self.step + 1) * self.spec.sequences_per_step)
        return max(0, step_end - self.seqs_started)

    def next_sequence(self) -> TrainSequence | None:
        """The next sequence of the current optimizer step, or None if all have started."""
        if not self.unstarted_in_step:
            return None
        n = len(self.spec.dataset)
        epoch, index = divmod(self.seqs_started, n)
        order = self.spec.dataset.order(epoch, self.spec.seed)
        self.seqs_started += 1
        return self.spec.dataset[int(order[index])]

    def progress(self) -> JobProgress:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        lr = float(self.spec.optimizer.schedule_fn(self.spec.total_steps)(self.step))
        return JobProgress(
            name=self.spec.name, state=self.state, step=self.step,
            total_steps=self.spec.total_steps, loss=self.losses[-1] if self.losses else None,
            losses=list(self.losses), learning_rate=lr, grad_norm=self.grad_norm,
            tokens_trained=self.tokens_trained, tokens_per_s=self.tokens_trained / elapsed,
            epoch=self.seqs_done // len(self.spec.dataset), error=self.error)

    def meta(self) -> dict:
        # Sequences of a partly done step live only in the gradient accumulators, which
        # are not saved: a resumed job restarts from the last step boundary.
        boundary = min(self.total_seqs, self.step * self.spec.sequences_per_step)
        return {"step": self.step, "seqs_done": boundary, "losses": self.losses,
                "tokens_trained": self.tokens_trained, "seed": self.spec.seed,
                "name": self.spec.name}

    def restore(self) -> bool:
        if self.checkpointer is None:
            return False
        restored = self.checkpointer.restore(self.params, self.opt_state)
        if restored is None:
            return False
        self.params, self.opt_state, meta = restored
        self.step = int(meta["step"])
        self.seqs_done = self.seqs_started = int(meta["seqs_done"])
        self.losses = [float(x) for x in meta["losses"]]
        self.tokens_trained = int(meta["tokens_trained"])
        log.info("job %s resumed at step %d", self.spec.name, self.step)
        return True


@functools.cache
def _jitted_update(optimizer, total_steps: int, rank: int, table_modules: tuple,
                   targets: tuple):
    """The jitted ``_apply_update`` for one optimizer config and adapter shape."""
    tx = optimizer.build(total_steps)
    return jax.jit(functools.partial(_apply_update, tx, rank, table_modules, targets),
                   donate_argnums=(0, 1, 2))


def _apply_update(tx, rank, table_modules, targets, params, opt_state,
                  train: TrainBuffers, slot, num_seqs):
    """One optimizer step from the slot's accumulated gradients (averaged over sequences).

    Returns (params, opt_state, train, {"a": padded A, "b": padded B}, grad_norm). With
    per-data-shard partial accumulators this is where they are summed: the one
    cross-shard gradient reduction of an optimizer step."""
    def slot_grad(g):  # [(G,) L, N, ...] -> [L, ...]
        g = jnp.take(g, slot, axis=g.ndim - 3)
        return g if g.ndim == 3 else jnp.sum(g, axis=0)

    grads = {m: {"a": slot_grad(train.grad_a[m])[..., :rank] / num_seqs,
                 "b": slot_grad(train.grad_b[m])[:, :rank, :] / num_seqs}
             for m in targets}
    grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    train = train.replace(
        grad_a={m: g.at[..., slot, :, :].set(0.0) for m, g in train.grad_a.items()},
        grad_b={m: g.at[..., slot, :, :].set(0.0) for m, g in train.grad_b.items()})
    padded_a, padded_b = {}, {}
    for m in table_modules:
        a_shape = train.grad_a[m].shape[-4:-3] + train.grad_a[m].shape[-2:]
        b_shape = train.grad_b[m].shape[-4:-3] + train.grad_b[m].shape[-2:]
        pa, pb = jnp.zeros(a_shape, jnp.float32), jnp.zeros(b_shape, jnp.float32)
        if m in params:
            pa = pa.at[..., :rank].set(params[m]["a"])
            pb = pb.at[:, :rank].set(params[m]["b"])
        padded_a[m], padded_b[m] = pa, pb
    return params, opt_state, train, {"a": padded_a, "b": padded_b}, grad_norm


class Trainer:
    """Runs every finetuning job of one engine."""

    def __init__(self, cfg: ModelConfig, registry: AdapterRegistry, allocator: PageAllocator,
                 config: TrainerConfig, dtype, layout=None, kernels: Kernels | None = None):
        """``kernels``: the attention and LoRA implementations of the backward pieces (the
        engine passes the step's, ``coserve_jax.step.step_kernels``; None: the default)."""
        if cfg.num_layers % config.backward_layers:
            raise ValueError(f"backward_layers ({config.backward_layers}) must divide the "
                             f"model's {cfg.num_layers} layers")
        self.cfg = cfg
        self.registry = registry
        self.allocator = allocator
        self.config = config
        self.layout = layout
        self.seq_buckets = powers_of_two(min(config.min_seq_bucket, config.max_len),
                                         config.max_len)
        if config.block and (config.block & (config.block - 1) or config.block < 2):
            raise ValueError(f"backward_block ({config.block}) must be a power of two >= 2 "
                             f"(or 0 for whole-sequence pieces)")
        if layout is None:
            self.buffers = TrainBuffers.zeros(cfg, registry.table, config.max_seqs,
                                              config.max_len, dtype, blocks=config.block > 0)
        else:  # one partial gradient sum per data shard (see TrainBuffers)
            if config.block:
                raise ValueError("token-block backward pieces (EngineConfig.backward_block) "
                                 "run on one device; use backward_block=0 on a mesh")
            layout.check_divides_tokens(self.seq_buckets, "backward sequence buckets")
            self.buffers = layout.zeros(TrainBuffers.zeros, cfg, registry.table,
                                        config.max_seqs, config.max_len, dtype,
                                        groups=layout.data_size)
        self.jobs: dict[str, JobRun] = {}
        self.writer = None  # a telemetry.ScalarWriter, set by the engine
        self._free_act = list(range(config.max_seqs - 1, -1, -1))
        self._backward = build_backward_piece(cfg, config.attention_block, layout, kernels)
        self._backward_block = (build_backward_block(cfg, layout, kernels) if config.block
                                else None)
        self._kernels = kernels
        self._sample_grads = None  # built on first use (temporal-seq modes only)
        self._kv_ids = 0

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
        run = JobRun(spec, slot, adapter, self.registry.modules, self.layout)
        self.jobs[spec.name] = run
        if run.restore():
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
        if run.checkpointer is None or run.state != "running":
            return None
        if run.checkpointer.latest_step() != run.step:
            run.checkpointer.save(run.step, run.params, run.opt_state, run.meta())
        return run.step

    def remove(self, name: str) -> None:
        """Forgets a job that is no longer running and frees its adapter slot."""
        run = self.jobs[name]
        if run.state == "running":
            raise InUse(f"job {name!r} is running; cancel it first")
        del self.jobs[name]
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
        """(sequence bucket, layers, token block) of the piece ``run_backward_piece(params,
        fits)`` would run next; None when no piece is ready (or none ``fits``)."""
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
                    f.forwarded, f.loss = 0, 0.0
                    n += 1
        return n

    # ----- forward windows ------------------------------------------------------------------

    def window_shape(self, budget: int, max_seqs: int) -> tuple[int, int]:
        """(windows, widest page table) that ``forward_windows(budget, max_seqs)`` would
        schedule, without scheduling anything: what the latency model needs to price a
        budget. Windows grow a sequence's page table only up to their own end, so early
        windows of long sequences stay in narrow (cheap) buckets."""
        windows = widest = 0
        free_act = len(self._free_act)
        for run in sorted((r for r in self.jobs.values() if r.state == "running"),
                          key=lambda r: r.tokens_scheduled / r.spec.weight):
            # (first position, most tokens) of each window the job would run, in order.
            todo = [(f.forwarded, min(self.config.window, f.length - f.forwarded))
                    for f in run.inflight if f.forwarded < f.length]
            starts = min(free_act, run.unstarted_in_step)
            free_act -= starts
            todo += [(0, self.config.window)] * starts  # a new sequence: at most one window
            for start, most in todo:
                if budget <= 0 or windows == max_seqs:
                    return windows, widest
                n = min(most, budget)
                widest = max(widest, self.allocator.pages_for(start + n))
                windows += 1
                budget -= n
        return windows, widest

    def forward_windows(self, budget: int, max_seqs: int) -> list[tuple[InFlight, SeqChunk]]:
        """Windows of training sequences for this iteration, within budget and free pages."""
        out = []
        runs = sorted((r for r in self.jobs.values() if r.state == "running"),
                      key=lambda r: r.tokens_scheduled / r.spec.weight)
        for run in runs:
            forwarding = [f for f in run.inflight if f.forwarded < f.length]
            while budget > 0 and len(out) < max_seqs:
                f = forwarding.pop(0) if forwarding else self._start_sequence(run)
                if f is None:
                    break
                n = min(self.config.window, f.length - f.forwarded, budget)
                if not self.allocator.can_grow(f.kv_id, f.forwarded + n):
                    break  # finetuning yields: inference keeps the pages
                table = self.allocator.grow(f.kv_id, f.forwarded + n)
                sl = slice(f.forwarded, f.forwarded + n)
                out.append((f, SeqChunk(
                    token_ids=list(f.seq.tokens[sl]), start_position=f.forwarded,
                    page_table=table, adapter_slot=run.slot, labels=f.labels[sl],
                    loss_weights=f.weights[sl], act_base=f.act_slot * self.config.max_len)))
                run.tokens_scheduled += n
                budget -= n
        return out

    def _start_sequence(self, run: JobRun) -> InFlight | None:
        if not self._free_act:
            return None
        seq = run.next_sequence()
        if seq is None:
            return None
        labels, weights = labels_and_weights(seq)
        self._kv_ids += 1
        f = InFlight(run, seq, labels, weights, self._free_act.pop(),
                     ("train", run.spec.name, self._kv_ids))
        run.inflight.append(f)
        return f

    def after_forward(self, windows: list[tuple[InFlight, SeqChunk]], seq_loss) -> None:
        """Books the windows a step ran; a finished forward frees its pages."""
        for i, (f, chunk) in enumerate(windows):
            f.forwarded += len(chunk.token_ids)
            f.loss += float(seq_loss[i])
            if f.forwarded == f.length:
                self.allocator.free(f.kv_id)
                f.layers_left, f.rows_left = self.cfg.num_layers, f.length

    # ----- backward pieces ------------------------------------------------------------------

    def warmup(self, params, progress: bool = True,
               repeats: int = 1) -> dict[PieceShape, float]:
        """Compiles the backward piece of every sequence bucket and times it; returns
        ``{(seq_len, layers, block): median seconds after the first run}``. A zero-length
        piece changes nothing (every row is masked) but costs the same as a full one."""
        from tqdm.auto import tqdm

        times = {}
        for seq_len in tqdm(self.seq_buckets, desc="compiling backward", disable=not progress):
            shape = self._shape_of(seq_len)
            # The last block of layer 0 of an empty sequence: nothing to pull back.
            empty = BackwardPiece(act_row=np.int32(0), layer_start=np.int32(0),
                                  length=np.int32(0), adapter_slot=np.int32(0),
                                  block_start=np.int32(0))
            def run(empty=empty, shape=shape):
                self.buffers = self._run_piece(params, empty, shape)
                return self.buffers.grads_h

            times[shape] = _median_seconds(run, repeats)
        return times

    def _run_piece(self, params, piece: BackwardPiece, shape: PieceShape) -> TrainBuffers:
        seq_len, layers, block = shape
        if block < seq_len:
            return self._backward_block(params, self.registry.table, self.buffers, piece,
                                        seq_len=seq_len, block=block)
        return self._backward(params, self.registry.table, self.buffers, piece,
                              num_layers=layers, seq_len=seq_len)

    def run_backward_piece(self, params,
                           fits: Callable[[PieceShape], bool] | None = None) -> bool:
        """Runs one backward piece of the sequence furthest along (among those whose piece
        ``fits``, see ``next_piece_shape``); False if none is ready.

        ``params`` are the frozen base weights the piece recomputes its layers with. A
        whole-sequence piece covers ``backward_layers`` layers; a token-block piece one
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
        self.buffers = self._run_piece(params, piece, shape)
        f.rows_left = first_row
        if first_row == 0:  # the layers are done; the next piece starts below them
            f.layers_left, f.rows_left = layer, f.length
        if f.layers_left == 0:
            self._sequence_done(f)
        return True

    def _sequence_done(self, f: InFlight) -> None:
        f.job.inflight.remove(f)
        self._free_act.append(f.act_slot)
        self._book_sequence(f.job, f.loss, f.length)

    def _book_sequence(self, run: JobRun, loss: float, length: int) -> None:
        """A sequence's gradients are complete: count it, and step the optimizer when it
        was the last sequence of the step."""
        run.seqs_done += 1
        run.seqs_in_step += 1
        run.loss_in_step += loss
        run.tokens_trained += length
        if run.seqs_in_step == run.seqs_for_step(run.step):
            self._optimizer_step(run)

    # ----- whole samples (temporal-seq baselines) -------------------------------------------

    def has_sample_work(self) -> bool:
        """Some running job has a sample of its current optimizer step left to run whole."""
        return any(r.state == "running" and r.unstarted_in_step for r in self.jobs.values())

    def _sample_program(self):
        if self._sample_grads is None:
            self._sample_grads = build_sample_grads(self.cfg, self.config.attention_block,
                                                    self.layout, self._kernels)
        return self._sample_grads

    def warmup_samples(self, params, progress: bool = True,
                       repeats: int = 1) -> dict[int, float]:
        """Compiles the whole-sample program for every length bucket and times it; returns
        ``{length bucket: median seconds after the first run}`` (zero weights: no change)."""
        from tqdm.auto import tqdm

        program = self._sample_program()
        times = {}
        for n in tqdm(self.seq_buckets, desc="compiling samples", disable=not progress):
            def run(n=n):
                zeros = np.zeros(n, np.int32)
                self.buffers, loss = program(params, self.registry.table, self.buffers, zeros,
                                             zeros, np.zeros(n, np.float32), np.int32(0))
                return loss

            times[n] = _median_seconds(run, repeats)
        return times

    def run_whole_sample(self, params) -> int:
        """Runs the next sample of the job furthest behind its share, whole: its forward over
        all tokens and its backward through every layer in one program, as a standard
        trainer does (``temporal-seq``). Returns its tokens, 0 if no job has one ready."""
        runs = [r for r in self.jobs.values() if r.state == "running" and r.unstarted_in_step]
        if not runs:
            return 0
        run = min(runs, key=lambda r: r.tokens_scheduled / r.spec.weight)
        seq = run.next_sequence()
        labels, weights = labels_and_weights(seq)
        length = len(seq.tokens)
        n = self._seq_bucket(length)
        pad = n - length
        tokens = np.pad(np.asarray(seq.tokens, np.int32), (0, pad))
        self.buffers, loss = self._sample_program()(
            params, self.registry.table, self.buffers, tokens,
            np.pad(labels, (0, pad)).astype(np.int32), np.pad(weights, (0, pad)),
            np.int32(run.slot))
        run.tokens_scheduled += length
        self._book_sequence(run, float(loss), length)
        return length

    def _optimizer_step(self, run: JobRun) -> None:
        n = run.seqs_in_step
        (run.params, run.opt_state, self.buffers, padded,
         grad_norm) = run._apply(run.params, run.opt_state, self.buffers,
                                 np.int32(run.slot), np.float32(n))
        self.registry.table = self.registry.write_slot(
            self.registry.table, np.int32(run.slot), padded["a"], padded["b"],
            np.float32(run.spec.lora.scale))
        run.grad_norm = float(grad_norm)
        run.losses.append(run.loss_in_step / n)
        run.step += 1
        if self.writer is not None:
            p = run.progress()
            self.writer.scalars(f"jobs/{run.spec.name}", {
                "loss": p.loss, "learning_rate": p.learning_rate, "grad_norm": p.grad_norm,
                "tokens_per_s": p.tokens_per_s}, run.step)
        run.seqs_in_step, run.loss_in_step = 0, 0.0
        every = run.spec.checkpoint_every
        done = run.step >= run.spec.total_steps
        try:
            if run.checkpointer is not None and (done or (every and run.step % every == 0)):
                run.checkpointer.save(run.step, run.params, run.opt_state, run.meta())
            if done:
                self._finish(run)
        except OSError as e:
            self._fail(run, e)

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
        host = tree_to_host(run.params)
        return LoraAdapter(run.spec.name, run.spec.lora,
                           {m: p["a"] for m, p in host.items()},
                           {m: p["b"] for m, p in host.items()})

    def _drop_inflight(self, run: JobRun) -> None:
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


def tree_to_host(tree):
    """A tree of device arrays as numpy. Arrays spread over other processes' devices
    (multi-host) are first replicated by one program, which every process must run
    together (``sharding.distributed`` makes followers do so)."""
    leaves = jax.tree.leaves(tree)
    if all(x.is_fully_addressable or x.is_fully_replicated for x in leaves):
        return jax.tree.map(np.asarray, tree)
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(leaves[0].sharding.mesh, PartitionSpec())
    return jax.tree.map(np.asarray, jax.jit(_identity, out_shardings=replicated)(tree))


def _identity(tree):
    # Module level, so repeated gathers of the same shapes reuse one compilation.
    return tree
