"""Training and serving curves in TensorBoard, and XLA traces of annotated steps.

Scalars go to TensorBoard event files through tensorboardX (no TensorFlow
dependency). Traces come from ``jax.profiler``: every traced iteration is a
``StepTraceAnnotation``; inside it the step's forward is annotated with its bucket
and its decode, prefill and finetuning-forward tokens, and each backward piece
with its shape, so TensorBoard's profile view shows where each kind of work's
time goes.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import numpy as np

from coserve_jax.errors import InUse, InvalidRequest

log = logging.getLogger(__name__)


class ScalarWriter:
    """Per-job and serving scalars under one run directory."""

    def __init__(self, run_dir: str):
        from tensorboardX import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self._writer = SummaryWriter(logdir=run_dir)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            if value is not None and np.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def forward_label(bucket, decode: int, prefill: int, finetune: int) -> str:
    """Trace label of a step's forward: its bucket and the tokens of each kind."""
    return (f"coserve_forward bucket=T{bucket.num_tokens}xS{bucket.num_seqs}xW{bucket.num_pages}"
            f" decode={decode} prefill={prefill} ft_fwd={finetune}")


def backward_label(seq_len: int, layers: int, block: int | None = None) -> str:
    """Trace label of a backward piece: its sequence bucket, layers and token block."""
    rows = "" if block is None or block >= seq_len else f" block={block}"
    return f"coserve_backward seq={seq_len} layers={layers}{rows}"


class Profiler:
    """Captures a ``jax.profiler`` trace of the next N engine steps."""

    def __init__(self):
        self._remaining = 0
        self._dir: str | None = None

    @property
    def active(self) -> bool:
        return self._remaining > 0

    def start(self, log_dir: str, num_steps: int) -> None:
        """Begins tracing; the trace is written after ``num_steps`` more steps."""
        if num_steps < 1:
            raise InvalidRequest(f"num_steps must be positive, got {num_steps}")
        if self.active:
            raise InUse("a trace is already being captured")
        os.makedirs(log_dir, exist_ok=True)
        jax.profiler.start_trace(log_dir)
        self._dir, self._remaining = log_dir, num_steps
        log.info("profiling the next %d steps into %s", num_steps, log_dir)

    @contextlib.contextmanager
    def step(self, step_num: int):
        """Marks one engine step while tracing; stops the trace after the last one."""
        if not self.active:
            yield
            return
        with jax.profiler.StepTraceAnnotation("coserve_step", step_num=step_num):
            yield
        self._remaining -= 1
        if self._remaining == 0:
            jax.profiler.stop_trace()
            log.info("trace written to %s", self._dir)

    def stop(self) -> None:
        if self.active:
            self._remaining = 0
            jax.profiler.stop_trace()
