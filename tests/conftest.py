"""Shared fixtures: tiny random-weight Hugging Face checkpoints saved once per session.

``make test`` runs the suite as four pytest processes (tests/pallas_kernels, tests/server,
and the top-level tests in two halves): in a single process of the whole suite, jaxlib
0.10.2 segfaulted in XLA's CPU compile (once) or in ``executable.serialize()`` for the
persistent cache (twice), always in
``test_step_kernels.py::test_finetuning_gradients_through_the_kernels[interpret]`` after
some 390 earlier tests; that test alone, each folder alone, and tests/pallas_kernels or
tests/server followed by it all pass. With the top-level tests in one process (some 275),
it aborted once in XLA's CPU compile of the whole-sample program
(``test_temporal_seq.py``, the 271st test); that file alone passes. The crash grows more
likely with the number of programs a process has compiled; which resource runs out is not
found yet.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from suite_flags import with_suite_flags

# Generated artefacts (the embedded model, measured latency models) go to a fresh
# directory per test session, so no test depends on what an earlier run left in
# ~/.cache.
os.environ.setdefault("COSERVE_HOME", tempfile.mkdtemp(prefix="coserve-home-"))

# Compile options for the suite's processes (suite_flags.py says why and what they cost).
os.environ["XLA_FLAGS"] = with_suite_flags(os.environ.get("XLA_FLAGS", ""))

from coserve_jax.programs import disable_compilation_cache

from hf_models import save_hf_model

# The pytest processes compile in memory only; subprocesses the tests start (workers, the
# CLI, the device check) still use the shared persistent cache. Two of the three crashes
# above were in ``executable.serialize()``, whose only caller is the cache write; with the
# cache off the third came in the compile itself, so this alone is no fix: the three-process
# split is what ran clean. It stays while the cause is open, so the configuration that ran
# clean is the one CI runs.
disable_compilation_cache()


def _saved(tmp_path_factory, style: str) -> str:
    return save_hf_model(style, tmp_path_factory.mktemp(f"hf-{style}"))


@pytest.fixture(scope="session")
def llama31_dir(tmp_path_factory) -> str:
    """A Llama 3.1-style checkpoint (llama3 RoPE scaling, GQA 4:1, untied head)."""
    return _saved(tmp_path_factory, "llama31")


@pytest.fixture(scope="session")
def llama32_dir(tmp_path_factory) -> str:
    """A Llama 3.2-style checkpoint (tied embeddings, explicit head_dim=64, GQA)."""
    return _saved(tmp_path_factory, "llama32")


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory) -> str:
    """A Qwen2.5-style checkpoint (non-zero q/k/v biases, tied embeddings, GQA)."""
    return _saved(tmp_path_factory, "qwen25")
