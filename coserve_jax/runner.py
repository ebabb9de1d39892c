"""The one owner of the engine's device state, and the commands that change it.

The runner holds every array the engine mutates: the KV pages, the sampled-token
feed, the adapter slot table, the finetuning buffers, and each job's LoRA weights and
optimizer state (the base weights are frozen and only read). It runs the programs of
``programs.py`` on them and nothing else does: the scheduler, the trainer and the
adapter registry are host bookkeeping that hand it commands.

A command (``runner_commands.py``) is a small frozen dataclass of host values (numpy
arrays, ints, names); ``Runner.execute`` is the one door. That makes a multi-host run
a matter of sending the same commands to every process (``sharding.distributed``):
the leader's runner calls its ``mirror`` hook with each command before executing it,
and the followers execute what they receive. ``COMMANDS`` lists every command type;
the leader refuses to send, and a test fails on, any command its followers do not
mirror.

Results are device arrays (a step's ``StepOutput``, a loss, a gradient norm) that the
caller reads when it needs them, so executing a command never waits for the device,
except the gathers and checkpoint commands, which copy to the host or to disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax import programs
from coserve_jax import runner_commands as commands
from coserve_jax.config import ModelConfig
from coserve_jax.finetune.buffers import TrainBuffers
from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.kv_cache import KVCache
from coserve_jax.lora.slots import AdapterSlots
from coserve_jax.step import StepOutput, head_cost_layers, segment_bounds
from pallas_kernels.dispatch import Kernels
from sharding.gather import tree_to_host

_SHAPES_RUN: dict[tuple, set[str]] = {}
"""Latency keys of the shapes run in this process, per set of programs and state shapes
(``Runner.shapes_run``)."""


def _state_signature(tree) -> tuple:
    """The tree structure, shapes and dtypes of ``tree``: with the programs, what decides
    whether a call compiles."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


@dataclasses.dataclass
class JobState:
    """A job's device state and the programs that update it."""

    params: Any  # {module: {"a": [L, in, r], "b": [L, r, out]}} float32
    opt_state: Any
    update: Callable
    checkpointer: JobCheckpointer | None


class Runner:
    """Owns the device arrays of one engine and executes commands on them."""

    def __init__(self, cfg: ModelConfig, params, *, kv: KVCache, feed_size: int,
                 slots: AdapterSlots | None, train: TrainBuffers | None,
                 kernels: Kernels, layout, attention_block: int = 256):
        """``kv``, ``slots`` and ``train`` are the initial (empty) state, already in their
        ``layout`` (``sharding.layout.Layout``; ``Layout.single`` for one device);
        ``feed_size`` is the most sequences of a step (the feed's length)."""
        self.cfg = cfg
        self.params = params
        self.layout = layout
        self.kernels = kernels
        self.kv = kv
        self.feed = layout.put(jnp.zeros((feed_size,), jnp.int32))
        self.slots = slots
        self.train = train
        self.jobs: dict[str, JobState] = {}
        self.mirror: Callable[[Any], None] | None = None
        """Called with each command before it runs (the multi-host leader's broadcast)."""
        self.step = programs.build_step(cfg, layout=layout, kernels=kernels)
        self._attention_block = attention_block
        self._backward = None
        self._backward_block = None
        self._sample = None
        self._sample_parts = None
        self.sample_part_h: jax.Array | None = None
        """What the last ``RunSamplePart`` hands the next: a segment's output (forward
        parts) or the gradient at a segment's input (the top and backward parts)."""
        self._sample_pullbacks: list = []  # of the segments whose backward part is to come
        self._write_slot = programs.build_write_slot(layout)
        # programs.py caches each program on (model config, layout, kernels, attention
        # block), so every runner with these and state of the same shapes shares the
        # compilations of its programs: a shape one engine has run, the next need not
        # run again to compile it.
        self.shapes_run: set[str] = _SHAPES_RUN.setdefault(
            (cfg, layout, kernels, attention_block,
             _state_signature((params, kv, self.feed, slots, train))), set())
        """Latency keys (``latency.bucket_key`` and friends) of the shapes that have run on
        these programs in this process, by this runner or an earlier one like it."""
        c = commands
        self._handlers: dict[type, Callable[[Any], Any]] = {
            c.RunStep: self._run_step, c.RunBackwardPiece: self._run_backward_piece,
            c.RunWholeSample: self._run_whole_sample, c.RunSamplePart: self._run_sample_part,
            c.DropSampleParts: self._drop_sample_parts, c.WriteSlot: self._write,
            c.StartJob: self._start_job, c.RestoreJob: self._restore_job,
            c.ApplyUpdate: self._apply_update, c.SaveJob: self._save_job,
            c.DropJob: self._drop_job, c.GatherJob: self._gather_job,
            c.GatherSlotGrads: self._gather_slot_grads,
        }
        assert set(self._handlers) == set(commands.COMMANDS)

    def execute(self, command) -> Any:
        """Runs one command (after handing it to ``mirror``); see each command's result."""
        handler = self._handlers.get(type(command))
        if handler is None:
            raise TypeError(f"not a runner command: {type(command).__name__}")
        if self.mirror is not None:
            self.mirror(command)
        return handler(command)

    # ----- programs, built on first use -----------------------------------------------------

    def backward_program(self):
        if self._backward is None:
            self._backward = programs.build_backward_piece(
                self.cfg, self._attention_block, self.layout, self.kernels)
        return self._backward

    def _block_program(self):
        if self._backward_block is None:
            self._backward_block = programs.build_backward_block(self.cfg, self.layout,
                                                                 self.kernels)
        return self._backward_block

    def _sample_program(self):
        if self._sample is None:
            self._sample = programs.build_sample_grads(self.cfg, self._attention_block,
                                                       self.layout, self.kernels)
        return self._sample

    def _sample_part_programs(self) -> programs.SamplePartPrograms:
        if self._sample_parts is None:
            self._sample_parts = programs.build_sample_parts(
                self.cfg, self._attention_block, self.layout, self.kernels)
        return self._sample_parts

    # ----- handlers -------------------------------------------------------------------------

    def _run_step(self, c: commands.RunStep) -> StepOutput:
        self.kv, self.train, self.feed, out = self.step(
            self.params, self.slots, self.kv, self.train, self.feed, c.batch,
            with_train=c.with_train)
        return out

    def _run_backward_piece(self, c: commands.RunBackwardPiece) -> None:
        if c.block < c.seq_len:
            self.train = self._block_program()(self.params, self.slots, self.train, c.piece,
                                               seq_len=c.seq_len, block=c.block)
        else:
            self.train = self.backward_program()(self.params, self.slots, self.train, c.piece,
                                                 num_layers=c.layers, seq_len=c.seq_len)

    def _run_whole_sample(self, c: commands.RunWholeSample) -> jax.Array:
        self.train, loss = self._sample_program()(
            self.params, self.slots, self.train, c.tokens, c.labels, c.weights,
            np.int32(c.slot))
        return loss

    def _run_sample_part(self, c: commands.RunSamplePart) -> jax.Array | None:
        fns = self._sample_part_programs()
        segments = (c.count + 1) // 2
        bounds = segment_bounds(self.cfg.num_layers, segments, head_cost_layers(self.cfg))
        slot = np.int32(c.slot)
        if c.index == 0:
            self._drop_sample_parts()
        if c.index < segments - 1:  # a segment's forward, bottom up
            s = c.index
            self.sample_part_h, pullback = fns.forward(
                self.params, self.slots, self.sample_part_h, c.tokens, slot,
                np.int32(bounds[s]), num_layers=bounds[s + 1] - bounds[s])
            self._sample_pullbacks.append(pullback)
            return None
        if c.index == segments - 1:  # the top segment: forward, loss, backward
            start = bounds[segments - 1]
            self.train, (loss, self.sample_part_h) = fns.top(
                self.params, self.slots, self.train, self.sample_part_h, c.labels, c.weights,
                slot, np.int32(start), num_layers=self.cfg.num_layers - start)
            return loss
        s = c.count - 1 - c.index  # a segment's backward, top down
        self.train, self.sample_part_h = fns.backward(
            self.params, self.slots, self.train, self._sample_pullbacks.pop(),
            self.sample_part_h, slot, np.int32(bounds[s]))
        return None

    def _drop_sample_parts(self, c: commands.DropSampleParts | None = None) -> None:
        self.sample_part_h, self._sample_pullbacks = None, []

    def _write(self, c: commands.WriteSlot) -> None:
        if c.a is None:
            a = {m: np.zeros(x.shape[:1] + x.shape[2:], np.float32)
                 for m, x in self.slots.a.items()}
            b = {m: np.zeros(x.shape[:1] + x.shape[2:], np.float32)
                 for m, x in self.slots.b.items()}
        else:
            a, b = c.a, c.b
        # Laid out as a job's update hands its weights to the same program, so that the
        # first optimizer step finds that program compiled (uncommitted host arrays would
        # compile a variant of their own).
        a, b = self.layout.put(a), self.layout.put(b)
        self.slots = self._write_slot(self.slots, np.int32(c.index), a, b,
                                      np.float32(c.scale))

    def _start_job(self, c: commands.StartJob) -> None:
        # Weights and optimizer state take the layout of the slots they feed.
        params = self.layout.put({m: {"a": c.a[m], "b": c.b[m]} for m in c.targets})
        init = programs.build_optimizer_init(c.optimizer, c.total_steps, self.layout)
        update = programs.build_optimizer_update(c.optimizer, c.total_steps, c.rank,
                                                 tuple(self.slots.a), c.targets, self.layout)
        opt_state = init(params)
        # Compiled now, when the job is submitted: its first update would otherwise
        # compile in the middle of serving, a stall no latency model foresees.
        update.compile(params, opt_state, self.train, np.int32(0), np.float32(1))
        self.jobs[c.name] = JobState(
            params, opt_state, update,
            JobCheckpointer(c.checkpoint_dir) if c.checkpoint_dir else None)

    def _restore_job(self, c: commands.RestoreJob) -> dict | None:
        job = self.jobs[c.name]
        if job.checkpointer is None:
            return None
        restored = job.checkpointer.restore(job.params, job.opt_state)
        if restored is None:
            return None
        job.params, job.opt_state, meta = restored
        return meta

    def _apply_update(self, c: commands.ApplyUpdate) -> jax.Array:
        job = self.jobs[c.name]
        job.params, job.opt_state, self.train, padded, grad_norm = job.update(
            job.params, job.opt_state, self.train, np.int32(c.slot), np.float32(c.num_seqs))
        self.slots = self._write_slot(self.slots, np.int32(c.slot), padded["a"], padded["b"],
                                      np.float32(c.scale))
        return grad_norm

    def _save_job(self, c: commands.SaveJob) -> None:
        job = self.jobs[c.name]
        job.checkpointer.save(c.step, job.params, job.opt_state, c.meta)

    def _drop_job(self, c: commands.DropJob) -> None:
        self.jobs.pop(c.name, None)

    def _gather_job(self, c: commands.GatherJob) -> dict:
        return tree_to_host(self.jobs[c.name].params)

    def _gather_slot_grads(self, c: commands.GatherSlotGrads) -> dict:
        return tree_to_host(programs.slot_grads(self.train, np.int32(c.slot)))
