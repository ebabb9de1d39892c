"""Shared fixtures: tiny random-weight Hugging Face checkpoints saved once per session.

``make test`` runs the whole suite in one pytest process. Until 2026-12-04 it ran as four:
a process of the whole suite crashed in XLA's CPU compile (or in the executable's
serialization for the persistent cache) after some 270 to 430 tests, not always in the same
place. The cause: XLA's CPU backend maps every compiled kernel into memory (some 200 maps for
a step program of the tiny model), jax keeps every executable it compiled while its caches
hold it, and the process reached Linux's limit of 65530 maps (``vm.max_map_count``): a
process of two test files had 26218 maps after two minutes. ``_release_compiled_programs``
below drops the caches after each module; the whole suite then peaked at 22198 maps and
passed in one process (878 s on the 2-core VM, about what the four processes took).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from suite_flags import with_suite_flags

# Generated artefacts (the embedded model, measured latency models) go to a fresh
# directory per test session, so no test depends on what an earlier run left in
# ~/.cache; it is removed when the session's process exits (the subprocesses tests start
# have exited by then). A COSERVE_HOME set by the caller is the caller's, and stays.
if "COSERVE_HOME" not in os.environ:
    os.environ["COSERVE_HOME"] = tempfile.mkdtemp(prefix="coserve-home-")
    atexit.register(shutil.rmtree, os.environ["COSERVE_HOME"], ignore_errors=True)

# Compile options for the suite's processes (suite_flags.py says why and what they cost).
os.environ["XLA_FLAGS"] = with_suite_flags(os.environ.get("XLA_FLAGS", ""))

import jax

from coserve_jax.programs import disable_compilation_cache

from hf_models import save_hf_model

# The pytest process compiles in memory only (the subprocesses tests start, such as workers,
# the CLI and the device check, still use the persistent cache under COSERVE_HOME). It was
# turned off while the crash above was open; whether the cache would shorten the suite now
# (a module may compile again what an earlier one did) is not measured.
disable_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. XLA's CPU backend maps each
    compiled kernel into memory (some 200 maps per step program of the tiny model) and
    keeps them while jax caches the executable; a process of the whole suite reached
    Linux's limit of 65530 maps per process (``vm.max_map_count``) and crashed in a
    compile. Programs a later module needs again are compiled again."""
    yield
    jax.clear_caches()


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
