"""The server process killed with SIGKILL mid-job and started again: the job resumes from
its last checkpoint by itself and finishes, and its exported adapter loads in PEFT and
gives the logits our forward gives with it."""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import peft
import torch
from transformers import LlamaForCausalLM

import coserve_jax
from coserve_jax.finetune.data import synthetic_task
from coserve_jax.lora.peft_io import load_adapter
from server.client import Client, finetune_request
from server.proto import coserve_pb2 as pb

from server_support import ROOT, ServerProcess, wait_for
from support import tiny_model

STEPS = 40


def _steps_saved(state_dir) -> list[int]:
    return [int(os.path.basename(p)) for p in
            glob.glob(os.path.join(state_dir, "jobs", "*", "checkpoint", "*"))
            if os.path.basename(p).isdigit()]


def test_sigkill_mid_job_resumes_and_exports_for_peft(tmp_path):
    state, adapters = tmp_path / "state", tmp_path / "adapters"
    adapters.mkdir()
    args = ["--config", os.path.join(ROOT, "configs", "demo.json"), "--no-warmup",
            "--state-dir", str(state), "--adapter-root", str(adapters), "--log-level", "WARNING"]
    proc = ServerProcess(args)
    try:
        with Client(proc.address()) as client:
            client.submit_finetune(finetune_request(
                "durable", records=synthetic_task("reverse", 64, seed=3), r=4, lora_alpha=8,
                sequences_per_step=2, max_steps=STEPS, checkpoint_every=4, max_seq_len=64,
                seed=11))
            wait_for(lambda: [s for s in _steps_saved(state) if s >= 4] or proc.proc.poll(),
                     300, what="a checkpoint")
            proc.proc.kill()  # SIGKILL: no drain, no last checkpoint
            proc.wait(30)
        killed_at = max(_steps_saved(state))
        assert 4 <= killed_at < STEPS
    finally:
        proc.kill()

    proc = ServerProcess(args)
    try:
        with Client(proc.address()) as client:
            job = client.get_job("durable")
            assert job.resumed_from_step == killed_at, proc.output
            final = list(client.watch_job("durable", interval_s=0.2))[-1]
            assert final.state == pb.JOB_STATE_COMPLETED and final.step == STEPS
            assert final.loss < final.first_loss
            client.export_adapter("durable", "exported")
        proc.proc.terminate()
        assert proc.wait(60) == 0, proc.output
    finally:
        proc.kill()

    # The export loads in PEFT without missing or unexpected keys ...
    path = str(adapters / "exported")
    base_dir = coserve_jax.tiny_model_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, path).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    # ... trained (B moved away from zero), and PEFT's logits with it match ours.
    ours = load_adapter(tiny_model(), path)
    assert any(np.abs(b).max() > 0 for b in ours.b.values())
    tokens = [[1, 117, 104, 121, 104, 117, 118, 104, 61, 35]]
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = coserve_jax.forward_logits(tiny_model(), tokens, adapter=ours)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
