"""Inference workloads for experiments: when requests arrive and how long they are.

Arrivals: Poisson, bursty (gamma inter-arrival times with a chosen coefficient of
variation), or replayed from a timestamps file in BurstGPT's CSV layout.
Lengths: fixed, uniform, lognormal (with ShareGPT's published means as a preset),
or read from a JSONL file of lengths.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np

# Mean prompt and response lengths of ShareGPT conversations as published with vLLM
# (Kwon et al., SOSP 2023: 161.31 input and 337.99 output tokens). The spread is not
# published there; SHAREGPT_SIGMA (log-space standard deviation) is our assumption.
SHAREGPT_MEAN_PROMPT = 161.31
SHAREGPT_MEAN_OUTPUT = 337.99
SHAREGPT_SIGMA = 1.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests of a trace: arrival offsets (seconds from the start) and lengths."""

    arrivals: np.ndarray  # [n] float64, non-decreasing
    prompt_lens: np.ndarray  # [n] int
    output_lens: np.ndarray  # [n] int

    def __len__(self) -> int:
        return len(self.arrivals)


def poisson_arrivals(rate: float, duration: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process of ``rate`` per second over ``duration`` s."""
    return gamma_arrivals(rate, 1.0, duration, seed)


def gamma_arrivals(rate: float, cv: float, duration: float, seed: int) -> np.ndarray:
    """Arrivals whose gaps are gamma distributed with mean 1/rate and coefficient of
    variation ``cv`` (1 is Poisson; larger is burstier)."""
    if not rate > 0 or not cv > 0 or not duration > 0:
        raise ValueError("rate, cv and duration must be positive")
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(rate * duration * 2 + 16))
    times = np.cumsum(gaps)
    while times[-1] < duration:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(
            rng.gamma(shape, 1.0 / (rate * shape), size=len(gaps)))])
    return times[times < duration]


def burstgpt_trace(path: str, duration: float | None = None, speedup: float = 1.0,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrivals, prompt lengths, output lengths) from a BurstGPT CSV
    (columns ``Timestamp, Model, Request tokens, Response tokens, ...``), starting at
    0, compressed by ``speedup`` and cut at ``duration`` seconds."""
    times, prompts, outputs = [], [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                times.append(float(row["Timestamp"]))
                prompts.append(int(row["Request tokens"]))
                outputs.append(int(row["Response tokens"]))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}, line {i}: expected BurstGPT columns Timestamp, "
                                 f"Request tokens, Response tokens ({e})") from None
    if not times:
        raise ValueError(f"{path} has no requests")
    order = np.argsort(times, kind="stable")
    t = (np.asarray(times)[order] - min(times)) / speedup
    keep = t < duration if duration is not None else np.ones_like(t, bool)
    return t[keep], np.asarray(prompts)[order][keep], np.asarray(outputs)[order][keep]


def fixed_lengths(n: int, length: int) -> np.ndarray:
    return np.full(n, length, np.int64)


def uniform_lengths(n: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """Lengths uniform in [lo, hi]."""
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n)


def lognormal_lengths(n: int, mean: float, sigma: float, seed: int, lo: int = 1,
                      hi: int | None = None) -> np.ndarray:
    """Lognormal lengths with the given mean and log-space sigma, clipped to [lo, hi]."""
    mu = math.log(mean) - sigma**2 / 2
    x = np.random.default_rng(seed).lognormal(mu, sigma, size=n)
    return np.clip(np.round(x), lo, hi).astype(np.int64)


def sharegpt_lengths(n: int, seed: int, scale: float = 1.0, max_prompt: int | None = None,
                     max_output: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths with ShareGPT's mean lengths times ``scale``."""
    prompts = lognormal_lengths(n, SHAREGPT_MEAN_PROMPT * scale, SHAREGPT_SIGMA, seed,
                                hi=max_prompt)
    outputs = lognormal_lengths(n, SHAREGPT_MEAN_OUTPUT * scale, SHAREGPT_SIGMA, seed + 1,
                                hi=max_output)
    return prompts, outputs


def lengths_from_jsonl(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths from lines like ``{"prompt_len": 12, "output_len": 40}``."""
    prompts, outputs = [], []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                p, o = int(rec["prompt_len"]), int(rec["output_len"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {i}: expected prompt_len and output_len "
                                 f"({e})") from None
            if p < 1 or o < 1:
                raise ValueError(f"{path}, line {i}: lengths must be positive")
            prompts.append(p)
            outputs.append(o)
    return np.asarray(prompts), np.asarray(outputs)
