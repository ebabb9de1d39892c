"""Sharding: meshes from config, the layout rules, sharded == single device, no LoRA
collectives in the forward, a real two-process run, and ``coserve plan``.

The default test process has one CPU device, so everything that needs several runs
in a subprocess: ``tests/sharded_worker.py`` with 8 simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and
``tests/multihost_worker.py`` as two ``jax.distributed`` processes of 4 devices each.
Each subprocess prints (or writes) JSON that the test asserts on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from coserve_jax.batch import TOKEN_FIELDS, Bucket, SeqChunk, build_batch
from coserve_jax.config import ModelConfig
from coserve_jax.plan import PRESETS
from coserve_jax.tiny_model import write_random_model
from sharding import Layout, MeshConfig, abstract_mesh

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TOL = 1e-5  # float32, as the single-device finetuning tests; summation order differs
sys.path.insert(0, TESTS)
from sharded_worker import hf_config  # noqa: E402


def run_worker(*args: str, devices: int = 8, timeout: float = 300) -> dict:
    """Runs ``tests/sharded_worker.py`` on ``devices`` simulated CPU devices; its JSON."""
    env = os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                        "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "sharded_worker.py"), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[int, str]:
    """Tiny random Llamas with 8 query heads and 8 or 2 KV heads."""
    out = {}
    for kv in (8, 2):
        path = str(tmp_path_factory.mktemp(f"kv{kv}"))
        write_random_model(path, hf_config(kv), seed=7, head_std=0.2)
        out[kv] = path
    return out


# ----- meshes and layout rules (in process, abstract meshes) ---------------------------------


def test_mesh_config_from_flags_and_json():
    assert MeshConfig.parse("model=8") == MeshConfig(model=8)
    assert MeshConfig.parse("data=2,model=4") == MeshConfig(data=2, model=4)
    assert MeshConfig.parse("data=2 model=4").describe() == "data=2,model=4"
    assert MeshConfig.parse(os.path.join(ROOT, "configs", "mesh_model8.json")) == \
        MeshConfig(model=8)
    assert MeshConfig.load(os.path.join(ROOT, "configs", "mesh_data2_model4.json")).size == 8
    for bad in ("model", "model=0", "pipeline=2", "model=2,model=4", ""):
        with pytest.raises(ValueError):
            MeshConfig.parse(bad)
    with pytest.raises(ValueError, match="device_order"):
        MeshConfig(model=2, device_order=(0, 0))


def test_layout_follows_megatron_and_dependent_parallelization():
    cfg = ModelConfig.from_hf_dict(PRESETS["qwen2.5-14b"])
    layout = Layout(abstract_mesh(MeshConfig(data=2, model=4)), cfg)
    spec = layout.spec_for
    # Base weights [L, in, out]: column-parallel split on out, row-parallel on in.
    assert spec(("layers", "q_proj"), (48, 5120, 5120)) == P(None, None, "model")
    assert spec(("layers", "down_proj"), (48, 13824, 5120)) == P(None, "model", None)
    assert spec(("layers", "q_bias"), (48, 5120)) == P(None, "model")
    assert spec(("layers", "input_norm"), (48, 5120)) == P(None, None)
    assert spec(("embed",), (152064, 5120)) == P("model", None)
    assert spec(("lm_head",), (5120, 152064)) == P(None, "model")
    # Slots [L, N, in, R] / [L, N, R, out]: B with a column split, A with a row split.
    assert spec(("a", "q_proj"), (48, 4, 5120, 16)) == P(None, None, None, None)
    assert spec(("b", "q_proj"), (48, 4, 16, 5120)) == P(None, None, None, "model")
    assert spec(("a", "o_proj"), (48, 4, 5120, 16)) == P(None, None, "model", None)
    assert spec(("b", "o_proj"), (48, 4, 16, 5120)) == P(None, None, None, None)
    # Gradient accumulators: the same, plus one partial sum per data shard.
    assert spec(("grad_a", "down_proj"), (2, 48, 4, 13824, 16)) == \
        P("data", None, None, "model", None)
    # A job's weights and its optax state, found by module name under any prefix.
    assert spec(("0", "mu", "down_proj", "a"), (48, 13824, 16)) == P(None, "model", None)
    # KV pages [L, P, page, 2 * Hkv, Dh]: the combined head axis, whole (K, V) pairs a shard.
    assert spec(("pages",), (48, 100, 16, 16, 128)) == P(None, None, None, "model", None)
    assert spec(("acts",), (48, 512, 5120)) == P(None, None, "model")
    # Saved projection outputs [L, rows, out]: split as the projection's output is.
    assert spec(("saved", "q_proj"), (48, 512, 5120)) == P(None, None, "model")
    assert spec(("saved", "down_proj"), (48, 512, 5120)) == P(None, None, "model")
    assert spec(("saved", "gate_proj"), (48, 512, 13824)) == P(None, None, "model")
    # 2 KV heads on a 4-way model axis: KV weights and pages are replicated (GQA).
    few_kv = ModelConfig.from_hf_dict(hf_config(2))
    layout = Layout(abstract_mesh(MeshConfig(model=4)), few_kv)
    # (4 combined heads would divide 4 ways, but that would part each head's K from its V.)
    assert layout.spec_for(("pages",), (2, 64, 4, 4, 32)) == P(None, None, None, None, None)
    assert layout.spec_for(("layers", "k_proj"), (2, 256, 64)) == P(None, None, None)
    assert layout.spec_for(("b", "k_proj"), (2, 3, 8, 64)) == P(None, None, None, None)
    assert layout.spec_for(("layers", "q_proj"), (2, 256, 256)) == P(None, None, "model")
    assert any("KV heads" in n for n in layout.notes)


def test_token_fields_are_the_batch_fields_with_a_token_axis():
    """``TOKEN_FIELDS`` (the core's list, handed to the layout) names exactly the TokenBatch
    fields with a leading T axis; the layout splits those on ``data`` and replicates the rest."""
    t, s, w = 16, 4, 3  # all different, so a leading T is not mistaken for S or W
    batch = build_batch([SeqChunk(token_ids=[1, 2, 3], start_position=0, page_table=[0])],
                        Bucket(num_tokens=t, num_seqs=s, num_pages=w), page_size=4)
    fields = {f.name: np.shape(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    assert {n for n, shape in fields.items() if shape[:1] == (t,)} == set(TOKEN_FIELDS)
    assert all(shape[:1] == (s,) for n, shape in fields.items() if n not in TOKEN_FIELDS)
    layout = Layout(abstract_mesh(MeshConfig(data=2, model=4)), ModelConfig.from_hf_dict(
        hf_config(2)))
    specs = layout.batch_specs(batch, TOKEN_FIELDS)
    for name, shape in fields.items():
        want = ("data",) if name in TOKEN_FIELDS else (None,) * len(shape)
        assert getattr(specs, name) == P(*want), name


# ----- 8 simulated devices -------------------------------------------------------------------


def check_parity(report: dict) -> None:
    for mesh, r in report.items():
        assert r["misplaced"] == [], (mesh, r["misplaced"])
        assert r["outputs_equal"] and r["next_equal"], (mesh, r)
        assert r["grads_nonzero"], mesh
        assert r["max_rel_err"] <= TOL, (mesh, r["worst"], r["max_rel_err"])


def test_sharded_step_equals_single_device(model_dirs):
    """model=8 and data=2 x model=4 (8 KV heads): sampled tokens (greedy and sampled, base
    and two adapters), logits, the LoRA gradients of a finetuning sequence whose windows
    shared the steps, and the weights after its optimizer step."""
    report = run_worker("parity", model_dirs[8], "model=8", "data=2,model=4")
    check_parity(report)
    partials = report["data=2,model=4"]["partials"]
    # Data parallelism: one partial gradient sum per data shard until the optimizer step.
    assert partials["groups"] == 2 and partials["differ"], partials
    assert partials["spec"].split(",")[0].endswith("('data'"), partials  # P('data', ...)


@pytest.mark.slow
def test_sharded_pieces_reusing_the_forwards_projections_equal_single_device(model_dirs):
    """data=2 x model=4 with ``keep_projections``: the saved projection outputs are laid
    out on the mesh and the backward pieces that reuse them give the same gradients."""
    check_parity(run_worker("parity-kept", model_dirs[8], "data=2,model=4"))


def test_sharded_step_equals_single_device_replicated_kv(model_dirs):
    """model=4 with 2 KV heads: KV weights and pages replicated, query heads split."""
    check_parity(run_worker("parity", model_dirs[2], "model=4"))


def check_kernel_parity(report: dict) -> None:
    for mesh, r in report.items():
        # The kernels ran, under shard_map, with no shape falling back to a reference.
        assert r["pallas"] == {"step": True, "backward": True}, (mesh, r["pallas"])
        assert r["reference_pallas"] == {"step": False, "backward": False}, mesh
        assert r["fallbacks"] == [], (mesh, r["fallbacks"])
        assert r["misplaced"] == [], (mesh, r["misplaced"])
        assert r["next_equal"] and r["finite"] and r["grads_nonzero"], (mesh, r)
        assert r["max_rel_err"] <= TOL, (mesh, r["worst"], r["max_rel_err"])
        # Inside the layer loop only the base model's two all-reduces (o_proj, down_proj):
        # the kernels' LoRA adds no collective.
        assert r["collectives"]["all-reduce in layer"] == 2, (mesh, r["collectives"])


def test_sharded_kernel_steps_equal_single_device(model_dirs):
    """The Pallas kernels (interpret mode) under shard_map on model=8 and data=2 x model=4
    (8 KV heads): two mixed steps (prompts on the base model and two adapters, greedy and
    sampled, around finetuning windows), then the sequence's backward pieces: logits,
    sampled tokens, losses and LoRA gradients equal the single-device references'."""
    report = run_worker("kernels", model_dirs[8], "model=8", "data=2,model=4")
    check_kernel_parity(report)
    counts = report["model=8"]["collectives"]
    others = {k: v for k, v in counts.items()
              if k.endswith(" in layer") and k != "all-reduce in layer"}
    assert not any(others.values()), counts


@pytest.mark.slow
def test_sharded_dense_lora_steps_equal_single_device(model_dirs):
    """``KernelConfig.dense_lora`` with no ``skip_unused_lora`` under shard_map on model=8:
    the masked einsum per device's part of the dependent layout, beside the attention
    kernel, gives the single-device references' logits, tokens, losses and gradients."""
    check_kernel_parity(run_worker("kernels-dense", model_dirs[8], "model=8"))


def test_sharded_kernel_steps_equal_single_device_replicated_kv(model_dirs):
    """model=4 with 2 KV heads: KV pages replicated, each device's attention kernel reads
    the one KV head its two query heads share."""
    check_kernel_parity(run_worker("kernels", model_dirs[2], "model=4"))


@pytest.mark.parametrize("cases", [
    ["12,3,model=4"],
    pytest.param(["8,2,model=4", "8,8,data=2,model=4", "8,8,model=8"], marks=pytest.mark.slow),
])
def test_sharded_attention_kernels_on_each_devices_heads(cases):
    """The paged attention and flash kernels under shard_map against the single-device
    references (flash: value and gradients). 12 query heads over 3 KV heads on model=4:
    each device's 3 query heads span 2 KV heads, so it reads one KV head per query head."""
    report = run_worker("attention", *cases)
    for case, r in report.items():
        assert max(r["errs"].values()) <= TOL, (case, r["errs"])
    if "12,3,model=4" in report:
        assert report["12,3,model=4"]["per_query"], report


def test_sharded_kernels_lower_to_triton():
    """The compiled kernels under shard_map lower for CUDA through Triton on this host (no
    GPU) at Llama-3.1-8B widths in bfloat16, on the three kinds of head split: paged
    attention and a column- and a row-parallel LoRA (1 + 2 + 2 Triton calls), and the
    flash pair (forward, dq, dk/dv). Each LoRA projection is skipped by a conditional when no
    token names a slot; with ``dense_lora`` and no ``skip_unused_lora`` the same step has the
    attention's Triton call alone and no conditional."""
    report = run_worker("cuda", "32,8,model=8", "32,8,data=2,model=4", "32,2,model=4")
    for case, counts in report.items():
        assert counts == {"step": 5, "flash": 3, "dense_step": 1, "step_conditionals": 2,
                          "dense_step_conditionals": 0}, (case, counts)


@pytest.fixture(scope="module")
def hlo_report(model_dirs) -> dict:
    return run_worker("hlo", model_dirs[8], "model=8", "data=2,model=4")


def test_lora_adds_no_collective_to_the_forward(hlo_report):
    """Compiled HLO of the model=8 step: with adapter slots and tokens naming them, the
    same collectives as the step without LoRA, and inside the layer loop only the base
    model's two all-reduces (o_proj, down_proj), also in finetuning steps."""
    report = hlo_report["forward"]
    assert report["lora/infer"] == report["base/infer"], report
    for key in ("lora/infer", "lora/train", "base/infer"):
        counts = report[key]
        assert counts["all-reduce in layer"] == 2, (key, counts)
        others = {k: v for k, v in counts.items()
                  if k.endswith(" in layer") and k != "all-reduce in layer"}
        assert not any(others.values()), (key, counts)


def test_gradients_cross_the_data_axis_once_per_optimizer_step(hlo_report):
    """data=2 x model=4, LoRA rank 7 (no other dimension is 7): the backward piece reduces
    LoRA tensors only over the model axis (groups of 4: the tensor-parallel backward of
    x @ A and of B), never over data (groups of 2; its data-axis reductions are attention
    activations); the optimizer update is where the per-data-shard partial sums meet."""
    report = hlo_report["gradients"]

    def lora(r: dict) -> bool:
        return any(7 in dims for dims in r["dims"])

    backward, update = report["backward"], report["update"]
    assert not [r for r in backward if r["group"] == 2 and lora(r)], backward
    assert [r for r in backward if r["group"] == 4 and lora(r)], backward  # detector works
    assert [r for r in update if r["group"] == 2 and lora(r)], update


# ----- two processes -------------------------------------------------------------------------


def test_distributed_settings_resolution(monkeypatch):
    """Which settings start jax.distributed (nothing is started here)."""
    from sharding import distributed

    for var in [*distributed.ENV_COORDINATOR, *distributed.ENV_NUM_PROCESSES,
                *distributed.ENV_PROCESS_ID, "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES"]:
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize_from_env_or_flags().source == "single"
    assert distributed.initialize_from_env_or_flags(num_processes=1).num_processes == 1
    with pytest.raises(ValueError, match="coordinator address"):
        distributed.initialize_from_env_or_flags("localhost:1234")
    monkeypatch.setenv("COSERVE_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="process count"):
        distributed.initialize_from_env_or_flags()
    monkeypatch.delenv("COSERVE_COORDINATOR_ADDRESS")
    monkeypatch.setenv("COSERVE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="integer"):
        distributed.initialize_from_env_or_flags()
    monkeypatch.delenv("COSERVE_NUM_PROCESSES")
    # srun with one task per node: the coordinator runs on the step's first node.
    for var, value in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_PROCID="3",
                           SLURM_STEP_NODELIST="gpu[007-010]", SLURM_STEP_NUM_NODES="4",
                           SLURM_LOCALID="0").items():
        monkeypatch.setenv(var, value)
    address, count, pid, source = distributed._from_slurm()
    assert address == f"gpu007:{4242 % 4096 + 61440}" and (count, pid, source) == (4, 3, "slurm")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "a1,b2")
    assert distributed._from_slurm()[0].startswith("a1:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_serve_and_finetune_like_one(model_dirs, tmp_path):
    """2 jax.distributed processes x 4 CPU devices (gloo), mesh data=2 x model=4: process 0
    schedules and broadcasts, process 1 follows; generations, LoRA gradients and the
    trained adapter equal a single-process, single-device run."""
    worker = os.path.join(TESTS, "multihost_worker.py")
    env = os.environ | {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    single, multi = str(tmp_path / "single.json"), str(tmp_path / "multi.json")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, worker, model_dirs[8], single, "single"],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen([sys.executable, worker, model_dirs[8], multi, str(pid), "2",
                                port, "data=2,model=4"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for pid in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    with open(single) as f:
        want = json.load(f)
    with open(multi) as f:
        got = json.load(f)
    assert got["outputs"] == want["outputs"]
    assert got["mixed_steps"] >= 1  # a finetuning window shared a step with inference
    for m in want["grads"]:
        for i in (0, 1):
            check_close(got["grads"][m][i], want["grads"][m][i], f"grad {m} {'ab'[i]}")
            check_close(got["trained"][m][i], want["trained"][m][i], f"trained {m}")


def check_close(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    scale = np.abs(want).max()
    if scale == 0:  # a fresh job's A gradients: B starts at zero
        assert np.abs(got).max() == 0, what
    else:
        assert np.abs(got - want).max() / scale <= TOL, what


# ----- coserve plan --------------------------------------------------------------------------


def coserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_plan_presets_flexllm_configurations_fit(tmp_path):
    """The state of FlexLLM's configurations (8B on 1, 14B on 2, 32B on 4 GPUs of 80 GB)
    fits with room for KV; 32B does not fit one GPU. State only (the temporaries of these
    shapes take minutes to compile; BENCHMARKS.md has them)."""
    out = tmp_path / "plan.json"
    proc = coserve("plan", "--model", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b",
                   "--mesh", "model=1", "model=2", "model=4", "--no-compile", "--json",
                   str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 32B on one GPU does not fit
    plans = {(p["model"], p["devices"]): p for p in json.loads(out.read_text())}
    for key in (("llama-3.1-8b", 1), ("qwen2.5-14b", 2), ("qwen2.5-32b", 4)):
        p = plans[key]
        assert p["fits"] and p["num_pages"] >= 2 * p["min_pages"], p
    assert not plans[("qwen2.5-32b", 1)]["fits"]
    assert 16.0e9 < plans[("llama-3.1-8b", 1)]["weights"] < 16.1e9  # 8.03B params, bf16
    # Split four ways but for the replicated norms.
    one, four = plans[("qwen2.5-32b", 1)]["weights"], plans[("qwen2.5-32b", 4)]["weights"]
    assert one / 4 < four < one / 4 * 1.001


def test_plan_compiles_the_sharded_programs(model_dirs, tmp_path):
    """With temporaries: the real sharded step and backward piece compiled on 2 virtual
    CPU devices for a model directory; a fixed page count that fits and one that does not."""
    out = tmp_path / "plan.json"
    args = ("plan", "--model", model_dirs[8], "--mesh", "model=2", "--device-memory-gb",
            "0.05", "--max-model-len", "256", "--max-num-batched-tokens", "64",
            "--max-num-seqs", "4", "--max-train-len", "128", "--job-rank", "8",
            "--max-lora-rank", "8", "--json", str(out))
    proc = coserve(*args, "--num-pages", "96")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [plan] = json.loads(out.read_text())
    assert plan["step_temp"] > 0 and plan["backward_temp"] > 0
    assert plan["num_pages"] == 96 and plan["fits"], plan
    assert "fits" in proc.stdout and "| model=" not in proc.stdout
    proc = coserve(*args, "--num-pages", "100000", "--no-compile")
    assert proc.returncode == 1 and "does NOT fit" in proc.stdout, proc.stdout
