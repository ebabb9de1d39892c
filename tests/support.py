"""Shared helpers for tests: the embedded model, greedy references, compile counting."""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np

import coserve_jax
from coserve_jax.model import Model

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
)


@functools.cache
def tiny_model() -> Model:
    return coserve_jax.load_model(coserve_jax.tiny_model_dir(), progress=False)


def greedy_reference(model: Model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the whole-sequence forward for every token."""
    tokens = list(prompt)
    for _ in range(n):
        logits = coserve_jax.forward_logits(model, [tokens])[0, -1]
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: an error relative to the scale of the reference."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@contextlib.contextmanager
def count_compilations():
    """Counts jaxpr traces and backend compilations inside the block: ``counts["n"]``."""
    counts = {"n": 0, "events": []}

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            counts["n"] += 1
            counts["events"].append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
