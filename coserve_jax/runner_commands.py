"""The commands the runner executes: every change to the engine's device state.

Each is a small frozen dataclass of host values (numpy arrays, ints, names), so it can
be pickled to the other processes of a multi-host run (``sharding.distributed``) and
executed there unchanged. ``coserve_jax.runner.Runner.execute`` runs them; their results
are described on each class.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: this module imports nothing of the core at run time
    from coserve_jax.batch import TokenBatch
    from coserve_jax.finetune.optim import OptimizerConfig
    from coserve_jax.step import BackwardPiece


@dataclasses.dataclass(frozen=True)
class RunStep:
    """Runs the co-serving step on a packed batch; returns its ``StepOutput``."""

    batch: TokenBatch
    """Numpy leaves, shaped by a bucket."""
    with_train: bool
    """The batch carries finetuning windows (the bucket's ``train``)."""


@dataclasses.dataclass(frozen=True)
class RunBackwardPiece:
    """Runs one backward piece: ``layers`` layers of a sequence over its whole bucket
    (``block == seq_len``), or one token block of one layer (``block < seq_len``)."""

    piece: BackwardPiece
    """Numpy scalars: which rows, layers and slot."""
    seq_len: int
    layers: int
    block: int


@dataclasses.dataclass(frozen=True)
class RunWholeSample:
    """Runs one whole training sample, forward and full backward (``temporal-seq``);
    returns its loss."""

    tokens: np.ndarray  # [n] int32, padded to a length bucket
    labels: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float32, 0 on padding
    slot: int


@dataclasses.dataclass(frozen=True)
class RunSamplePart:
    """Runs part ``index`` of one training sample run in ``count`` = 2K - 1 parts over K
    segments of layers (``step.segment_bounds``): first the forward of each segment but
    the top one, bottom up; then the top segment's forward, the loss and its backward;
    then the backward of each segment below, top down. Together they compute what
    ``RunWholeSample`` does (coserve's whole-sample unit, for a sample too long to run
    whole beside requests). The runner holds what passes between parts (a segment's
    output and pullback, the gradient at a segment's input) from part 0 to the last.
    Returns the loss at the top part (index K - 1), None at the others."""

    tokens: np.ndarray  # [n] int32, padded to a length bucket
    labels: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float32, 0 on padding
    slot: int
    index: int
    count: int


@dataclasses.dataclass(frozen=True)
class DropSampleParts:
    """Frees what the runner holds of a sample run in parts that will not finish (its job
    was cancelled or failed)."""


@dataclasses.dataclass(frozen=True)
class WriteSlot:
    """Writes adapter weights (padded to the table's rank) into slot ``index``; ``a`` and
    ``b`` None clear it (an unload)."""

    index: int
    a: dict[str, np.ndarray] | None  # module -> [L, in, R] float32
    b: dict[str, np.ndarray] | None  # module -> [L, R, out] float32
    scale: float


@dataclasses.dataclass(frozen=True)
class StartJob:
    """Creates a job's weights (from its initial adapter) and optimizer state."""

    name: str
    optimizer: OptimizerConfig
    total_steps: int
    rank: int
    targets: tuple[str, ...]
    a: dict[str, np.ndarray]  # module -> [L, in, r]
    b: dict[str, np.ndarray]  # module -> [L, r, out]
    checkpoint_dir: str | None


@dataclasses.dataclass(frozen=True)
class RestoreJob:
    """Loads a job's latest checkpoint, if it has one; returns its metadata or None."""

    name: str


@dataclasses.dataclass(frozen=True)
class ApplyUpdate:
    """One optimizer step of a job from its slot's accumulated gradients, averaged over
    ``num_seqs`` sequences; writes the new weights into the slot. Returns the gradient
    norm (a device scalar)."""

    name: str
    slot: int
    num_seqs: int
    scale: float


@dataclasses.dataclass(frozen=True)
class SaveJob:
    """Checkpoints a job's weights and optimizer state at ``step`` with ``meta``."""

    name: str
    step: int
    meta: dict


@dataclasses.dataclass(frozen=True)
class DropJob:
    """Forgets a job's device state."""

    name: str


@dataclasses.dataclass(frozen=True)
class GatherJob:
    """A host copy of a job's weights: ``{module: {"a": [L, in, r], "b": [L, r, out]}}``."""

    name: str


@dataclasses.dataclass(frozen=True)
class GatherSlotGrads:
    """A host copy of one slot's accumulated LoRA gradients: ``{module: (A, B)}``."""

    slot: int


COMMANDS = (RunStep, RunBackwardPiece, RunWholeSample, RunSamplePart, DropSampleParts,
            WriteSlot, StartJob, RestoreJob, ApplyUpdate, SaveJob, DropJob, GatherJob,
            GatherSlotGrads)
"""Every command the runner executes (``sharding.distributed`` mirrors each)."""
