"""A finetuning job: what to train (spec), and how far it got (progress)."""

from __future__ import annotations

import dataclasses
import re

from coserve_jax.errors import InvalidRequest
from coserve_jax.finetune.optim import OptimizerConfig
from coserve_jax.lora.config import LoraConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """A LoRA finetuning job. The adapter it trains is served under ``name`` while it runs."""

    name: str
    """Job and adapter name (letters, digits, ``._-``)."""
    dataset: object
    """A ``coserve_jax.finetune.data.Dataset`` of tokenized training sequences."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """Shape of the adapter to train."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Optimizer, schedule and clipping."""
    sequences_per_step: int = 8
    """Sequences whose gradients are averaged into one optimizer step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run ``epochs`` over the data)."""
    epochs: int = 1
    """Passes over the dataset when ``max_steps`` is None."""
    checkpoint_dir: str | None = None
    """Where progress is checkpointed (orbax); a job resumes from here after a restart."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    export_dir: str | None = None
    """Where the finished adapter is written in Hugging Face PEFT format."""
    seed: int = 0
    """Seeds the adapter's initialisation and the data order."""
    weight: float = 1.0
    """Share of the finetuning budget relative to other jobs."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidRequest(f"job name {self.name!r} must be 1-128 letters, digits or ._-")
        if len(self.dataset) == 0:
            raise InvalidRequest(f"job {self.name!r} has no usable samples")
        if self.lora.lora_dropout != 0:
            raise InvalidRequest("lora_dropout > 0 is not supported for training yet")
        for field in ("sequences_per_step", "epochs"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{field} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise InvalidRequest(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise InvalidRequest("checkpoint_every must be an integer >= 0")
        if not self.weight > 0:
            raise InvalidRequest(f"weight must be positive, got {self.weight!r}")

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.epochs * len(self.dataset) // self.sequences_per_step)


@dataclasses.dataclass
class JobProgress:
    """A snapshot of a job, readable at any time."""

    name: str
    state: str  # queued | running | completed | cancelled | failed
    step: int
    total_steps: int
    loss: float | None  # mean sequence loss of the last optimizer step
    losses: list[float]  # per optimizer step
    learning_rate: float | None
    grad_norm: float | None
    tokens_trained: int  # tokens whose forward and backward both finished
    tokens_per_s: float
    epoch: int
    error: str | None = None
