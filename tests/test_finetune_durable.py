"""A training process killed with SIGKILL resumes from its last checkpoint and ends the same."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
STEPS = 24


def _start(ckpt, export):
    return subprocess.Popen([sys.executable, WORKER, str(ckpt), str(export), str(STEPS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_steps(ckpt) -> list[int]:
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def test_sigkill_mid_job_resumes_and_matches_uninterrupted(tmp_path):
    ckpt, export = tmp_path / "ckpt", tmp_path / "adapter"
    proc = _start(ckpt, export)
    deadline = time.monotonic() + 300
    while not [s for s in _checkpoint_steps(ckpt) if s >= 4]:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_checkpoint_steps(ckpt))
    assert killed_at < STEPS and not export.exists()

    proc = _start(ckpt, export)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"started at step {killed_at}" in out and f"finished at step {STEPS}" in out

    ref_ckpt, ref_export = tmp_path / "ref_ckpt", tmp_path / "ref_adapter"
    ref = _start(ref_ckpt, ref_export)
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out
    assert "started at step 0" in ref_out

    got = load_file(str(export / "adapter_model.safetensors"))
    want = load_file(str(ref_export / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k)
