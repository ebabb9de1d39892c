"""Workload generators: arrivals and lengths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coserve_jax.workload import (
    SHAREGPT_MEAN_OUTPUT,
    SHAREGPT_MEAN_PROMPT,
    burstgpt_trace,
    gamma_arrivals,
    lengths_from_jsonl,
    poisson_arrivals,
    sharegpt_lengths,
    uniform_lengths,
)


def test_poisson_rate_and_exponential_gaps():
    t = poisson_arrivals(50.0, 200.0, seed=0)
    assert t.min() >= 0 and t.max() < 200 and np.all(np.diff(t) >= 0)
    assert abs(len(t) / 200 - 50) < 2
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: cv 1


def test_gamma_is_burstier_with_same_rate():
    t = gamma_arrivals(50.0, 3.0, 200.0, seed=1)
    gaps = np.diff(t)
    assert abs(len(t) / 200 - 50) < 5
    assert gaps.std() / gaps.mean() > 2.5


def test_burstgpt_csv(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "10,ChatGPT,5,7,12,Conversation log\n"
                    "4,ChatGPT,3,2,5,Conversation log\n"
                    "30,GPT-4,8,9,17,API log\n")
    t, p, o = burstgpt_trace(str(path), speedup=2.0)
    np.testing.assert_allclose(t, [0, 3, 13])
    assert p.tolist() == [3, 5, 8] and o.tolist() == [2, 7, 9]
    t, _, _ = burstgpt_trace(str(path), duration=10, speedup=2.0)
    assert len(t) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("Timestamp,Model\n1,x\n")
    with pytest.raises(ValueError, match="line 2"):
        burstgpt_trace(str(bad))


def test_sharegpt_means_and_clipping():
    p, o = sharegpt_lengths(200_000, seed=0)
    assert abs(p.mean() / SHAREGPT_MEAN_PROMPT - 1) < 0.03
    assert abs(o.mean() / SHAREGPT_MEAN_OUTPUT - 1) < 0.03
    p, o = sharegpt_lengths(1000, seed=0, scale=0.25, max_prompt=50, max_output=60)
    assert p.min() >= 1 and p.max() <= 50 and o.max() <= 60
    u = uniform_lengths(1000, 3, 9, seed=0)
    assert u.min() == 3 and u.max() == 9


def test_lengths_from_jsonl(tmp_path):
    path = tmp_path / "lens.jsonl"
    path.write_text(json.dumps({"prompt_len": 4, "output_len": 9}) + "\n\n"
                    + json.dumps({"prompt_len": 2, "output_len": 1}) + "\n")
    p, o = lengths_from_jsonl(str(path))
    assert p.tolist() == [4, 2] and o.tolist() == [9, 1]
    path.write_text(json.dumps({"prompt_len": 4}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        lengths_from_jsonl(str(path))
