"""Shared fixtures: tiny random-weight Hugging Face checkpoints saved once per session.

``make test`` runs the suite as three pytest processes (tests/pallas_kernels, tests/server,
the rest): in a single process of the whole suite, jaxlib 0.10.2 segfaulted in XLA's CPU
compile (once) or in ``executable.serialize()`` for the persistent cache (twice), always in
``test_step_kernels.py::test_finetuning_gradients_through_the_kernels[interpret]`` after
some 390 earlier tests; that test alone, each folder alone, and tests/pallas_kernels or
tests/server followed by it all pass. Which earlier test leaves the process in that state
is not found yet.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# Generated artefacts (the embedded model, measured latency models) go to a fresh
# directory per test session, so no test depends on what an earlier run left in
# ~/.cache; the XLA compilation cache stays shared, it only makes things faster.
os.environ.setdefault("COSERVE_HOME", tempfile.mkdtemp(prefix="coserve-home-"))

from coserve_jax.step import disable_compilation_cache

from hf_models import save_hf_model

# The pytest process itself compiles in memory only. After the whole suite has run in one
# process (about 400 tests), jaxlib 0.10.2 crashed with a segmentation fault inside
# ``executable.serialize()`` while writing a new executable to the persistent cache (twice,
# at the same test; each test file alone, and the root, pallas_kernels and server folders
# alone, pass). Cache writes are the only caller of ``serialize``. Subprocesses the tests
# start (workers, the CLI, the device check) still use the shared cache.
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
