"""The README's slow-test command runs the ``pytest`` entry point itself, not ``python -m
pytest``, which also puts the current directory on ``sys.path``. Without the repository
root on the path (``pythonpath`` in pyproject.toml) the directory ``tests/pallas_kernels/``
is found as a namespace package named ``pallas_kernels`` and shadows the real one, and five
modules failed to collect."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_pytest_command_finds_the_repositorys_packages():
    pytest_command = shutil.which("pytest", path=os.path.dirname(sys.executable))
    if pytest_command is None:
        pytest.skip("no pytest entry point beside this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [pytest_command, "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/pallas_kernels/test_kernel_dispatch.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tests collected" in done.stdout or "test collected" in done.stdout
