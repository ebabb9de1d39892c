"""Latency objectives of inference requests and what each request achieved."""

from __future__ import annotations

import dataclasses
import math

from coserve_jax.errors import AdmissionError  # noqa: F401 (moved there; old imports work)


@dataclasses.dataclass(frozen=True)
class SLO:
    """Targets of one request. A request attains its SLO when both are met."""

    ttft_s: float
    """Arrival to first token, queueing included."""
    tpot_s: float
    """Mean time per output token after the first."""

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, "
                                 f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Timings of a finished request (monotonic-clock seconds)."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    slo: SLO

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_s(self) -> float:
        """Mean inter-token time after the first token (0 for a single-token output)."""
        if self.first_token_time is None or self.num_output_tokens < 2:
            return 0.0
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def slo_attained(self) -> bool:
        return (self.ttft_s is not None and self.ttft_s <= self.slo.ttft_s
                and self.tpot_s <= self.slo.tpot_s)
