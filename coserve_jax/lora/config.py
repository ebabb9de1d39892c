"""LoRA configuration, with fields named as Hugging Face PEFT names them."""

from __future__ import annotations

import dataclasses
import math

from coserve_jax.models.llama import PROJECTIONS

ALL_TARGETS = PROJECTIONS  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's shape and scaling."""

    r: int = 8
    """Rank of the update B·A."""
    lora_alpha: float = 16.0
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training (PEFT semantics); inactive at inference."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Projections that carry the adapter, by Hugging Face module name."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(
            self.target_modules)
        if not targets:
            raise ValueError("target_modules is empty")
        for t in targets:
            if t not in ALL_TARGETS:
                raise ValueError(f"unknown target module {t!r}; supported: {list(ALL_TARGETS)}")
        # Canonical order, no duplicates, so equal configs compare equal.
        object.__setattr__(self, "target_modules", tuple(t for t in ALL_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
