"""The five parts of ``bench/device_check.py``, each run in its own process (``run_part``):
environment and ceilings, kernels against references, the engine end to end, decode and
prefill against the hardware floors, a short co-serving run. jax is imported here, in the
part's process only."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import step_profile
from device_records import STATUS_FAILED, Report, read_record

import benchlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distributions whose versions part 1 records; the project's own dependencies that the GPU
# image lacks (tensorboardX, grpcio-health-checking, grpcio-reflection) are listed so that
# the record shows them absent: nothing this script runs imports them.
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes",
             "transformers", "tokenizers", "safetensors", "tqdm", "triton", "torch",
             "grpcio", "protobuf", "prometheus-client", "tensorboardX",
             "grpcio-health-checking", "grpcio-reflection")


# The Python distributions of the GPU image ('cuda' on nvidia-h200, as read 2026-11-17;
# /work/.library/device/KINDS.md), lower case with "-" for "_". No registry is reachable
# there, so what the project needs beyond these must travel as wheels.
_GPU_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"""
GPU_IMAGE_PACKAGES = frozenset(_GPU_IMAGE_LIST.split())


def normalized(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def dependencies_missing_on_image() -> list[str]:
    """The project's own dependencies (pyproject.toml) that the GPU image lacks."""
    import re
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    names = [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in requirements]
    return [n for n in names if normalized(n) not in GPU_IMAGE_PACKAGES]


def imported_but_missing_on_image() -> tuple[list[str], list[str]]:
    """(dependencies missing on the GPU image, those of them this process has imported).

    Only the project's direct dependencies are held to the image's list: what they import
    in turn is the image's concern, and its versions differ from this machine's."""
    from importlib import metadata

    missing = dependencies_missing_on_image()
    by_distribution: dict[str, set[str]] = collections.defaultdict(set)
    for module, distributions in metadata.packages_distributions().items():
        for d in distributions:
            by_distribution[normalized(d)].add(module)
    imported = [d for d in missing
                if any(m in sys.modules for m in by_distribution.get(normalized(d), ()))]
    return missing, imported


def sci(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def device_label() -> str:
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()})"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes every part uses: Llama-3.1-8B on a GPU, tiny ones in a dry run."""

    dry_run: bool
    layers: int | None = None  # overrides the 8B-shape model's layer count (parts 3-5)

    @property
    def kernels_impl(self) -> str:
        return "interpret" if self.dry_run else "kernel"

    @property
    def dtype(self) -> str:
        return "float32" if self.dry_run else "bfloat16"

    def model_config(self):
        """Llama-3.1-8B, or its proportions at hidden 256 (2 layers) in a dry run."""
        et = importlib.import_module("engine_throughput")
        if self.dry_run:
            return et.tiny_8b_like_config(self.layers or 2)
        return et.llama3_8b_config(self.layers or 32)


def random_adapters(names: list[str], cfg, rank: int, seed: int):
    """LoRA adapters of ``rank`` on all 7 projections with non-zero A and B (a trained
    adapter's scale). They share one set of arrays: a step's cost does not depend on the
    values, and 8B-shape adapters take 168 MB of host memory each."""

    from coserve_jax import LoraAdapter, LoraConfig
    from coserve_jax.lora.config import ALL_TARGETS

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_TARGETS)
    base = LoraAdapter.zeros_b(names[0], lora, cfg, seed)
    rng = np.random.default_rng(seed)
    b = {m: rng.normal(0, 0.05, base.b[m].shape).astype(np.float32) for m in ALL_TARGETS}
    return [LoraAdapter(name, lora, base.a, b) for name in names]


# ================================================================ part 1: environment


def run_env(rep: Report, shapes: Shapes) -> None:
    rep.results["python"] = platform.python_version()
    rep.results["versions"] = benchlib.distribution_versions(VERSIONED)
    rep.results["library_revision"] = benchlib.library_revision()
    devices = jax.devices()
    rep.results["backend"] = jax.default_backend()
    rep.results["devices"] = [f"{d.device_kind} ({d.platform})" for d in devices]
    with contextlib.suppress(Exception):  # not every backend reports memory
        stats = devices[0].memory_stats() or {}
        rep.results["device_memory_bytes"] = stats.get("bytes_limit")
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        rep.results["nvidia_smi"] = (query.stdout or query.stderr).strip()
    with contextlib.suppress(Exception):
        rep.results["jax_environment"] = jax.print_environment_info(return_string=True)

    # Optional jax pieces the kernels part compares against or dispatches to.
    optional = {
        "pallas triton backend": "jax.experimental.pallas.triton",
        "jax GPU paged_attention": "jax.experimental.pallas.ops.gpu.paged_attention",
        "jax TPU ragged_paged_attention":
            "jax.experimental.pallas.ops.tpu.ragged_paged_attention",
    }
    imports = {}
    for label, module in optional.items():
        try:
            importlib.import_module(module)
            imports[label] = "ok"
        except Exception as e:  # an optional piece: record why, go on
            imports[label] = f"{type(e).__name__}: {e}"[:200]
    rep.results["optional_imports"] = imports
    # The project itself must import on this image (nothing beyond what the image has).
    project = {}
    for module in ("coserve_jax", "pallas_kernels", "coserve_jax.engine", "coserve_jax.step"):
        try:
            importlib.import_module(module)
            project[module] = "ok"
        except Exception as e:
            project[module] = f"{type(e).__name__}: {e}"[:200]
    rep.results["project_imports"] = project
    if "coserve_jax" in sys.modules:  # which checkout ran (an installed copy could shadow it)
        rep.results["project_path"] = os.path.dirname(
            os.path.dirname(sys.modules["coserve_jax"].__file__))
    rep.check("project imports", all(v == "ok" for v in project.values()),
              ", ".join(f"{k}: {v}" for k, v in project.items() if v != "ok") or "all import")
    rep.platform = f"{devices[0].device_kind} ({jax.default_backend()})"
    rep.save()

    # 2 GiB (40 times the H200's L2) and an 8192-cube matmul (1.1 TFLOP per call).
    copy_bytes, n, dtype = ((16 << 20, 256, "float32") if shapes.dry_run
                            else (2 << 30, 8192, "bfloat16"))
    bandwidth = benchlib.copy_bandwidth(copy_bytes, repeats=10, dtype=dtype)
    rep.results["copy_bandwidth_Bps"] = bandwidth
    rep.results["copy_bytes"] = copy_bytes
    rep.save()
    flops = benchlib.matmul_flops(n, repeats=10, dtype=dtype)
    rep.results["matmul_flops"] = flops
    rep.results["matmul_n"], rep.results["matmul_dtype"] = n, dtype
    rep.check("ceilings measured", bandwidth > 0 and flops > 0 and math.isfinite(bandwidth)
              and math.isfinite(flops),
              f"copy {bandwidth / 1e9:,.1f} GB/s, matmul {flops / 1e12:,.2f} TFLOP/s")
    versions = rep.results["versions"]
    rep.table("Environment", ["what", "value"], [
        ["devices", ", ".join(rep.results["devices"])],
        ["nvidia-smi", rep.results.get("nvidia_smi", "n/a")],
        ["python", rep.results["python"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v != "absent")],
        ["absent", ", ".join(k for k, v in versions.items() if v == "absent") or "none"],
        ["optional jax kernels", ", ".join(f"{k}: {v}" for k, v in imports.items())],
        ["copy bandwidth", f"{bandwidth / 1e9:,.1f} GB/s ({copy_bytes >> 20} MiB {dtype} x + 1,"
                           " read + write)"],
        [f"{dtype} matmul", f"{flops / 1e12:,.2f} TFLOP/s (n={n})"],
    ])
    rep.summary = (f"{rep.platform}; jax {versions['jax']}; copy {bandwidth / 1e9:,.1f} GB/s; "
                   f"{dtype} matmul {flops / 1e12:,.2f} TFLOP/s")


def measured_ceilings(rep: Report, shapes: Shapes) -> tuple[float, float]:
    """Copy bandwidth and matmul FLOP/s from part 1's record, or measured again here."""
    env = read_record(rep.out_dir, "env")
    results = (env or {}).get("results", {})
    if "copy_bandwidth_Bps" in results and "matmul_flops" in results:
        return results["copy_bandwidth_Bps"], results["matmul_flops"]

    copy_bytes, n = (16 << 20, 256) if shapes.dry_run else (2 << 30, 8192)
    rep.note("part 1's ceilings were not available: measured again in this part")
    return (benchlib.copy_bandwidth(copy_bytes, 5, shapes.dtype),
            benchlib.matmul_flops(n, 5, shapes.dtype))


# ================================================================ part 2: kernels


def upcast(tree):
    """Floating leaves to float32 (the higher-precision reference's inputs)."""

    def leaf(x):
        is_float = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(jnp.float32) if is_float else x

    return jax.tree.map(leaf, tree)


def tree_relative_error(out, ref) -> float:
    """The largest ``||out - ref|| / ||ref||`` over the leaves (outputs and gradients)."""


    out_leaves, ref_leaves = jax.tree.leaves(out), jax.tree.leaves(ref)
    if len(out_leaves) != len(ref_leaves):
        raise ValueError(f"{len(out_leaves)} outputs vs {len(ref_leaves)} in the reference")
    return max(benchlib.relative_error(np.asarray(o, np.float32), np.asarray(r, np.float32))
               for o, r in zip(out_leaves, ref_leaves, strict=True))


def tree_nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class CheckedBench:
    """The ``Bench`` interface of ``bench/kernels.py`` (its case builders call ``case``),
    checked the way a device measurement must be: every implementation's output against a
    float32 reference (the reference implementation run on upcast inputs at "highest"
    matmul precision), after poisoning the allocator; the time is the median per call.
    Implementations named "ours ..." are our kernels: each must stay within ``bound`` of
    the float32 reference, or within twice the reference implementation's own error in
    the same dtype where that is larger. Other implementations are comparisons only."""

    def __init__(self, rep: Report, bound: float, repeats: int, calls: int,
                 kv_bytes: Callable[[str], int | None] = lambda name: None):
        self.rep, self.bound, self.repeats, self.calls = rep, bound, repeats, calls
        self.kv_bytes = kv_bytes
        self.rows: list[dict] = []

    def case(self, name: str, impls: dict, reference: str = "XLA reference") -> None:
        if self.rep.out_of_time(f"kernel case {name!r}"):
            return
        case_start = time.monotonic()
        ref_fn, ref_args = impls[reference]
        ref32 = None
        # jnp.issubdtype: numpy's own does not count bfloat16 as floating.
        if any(x.dtype != jnp.float32 for x in jax.tree.leaves(ref_args)
               if jnp.issubdtype(x.dtype, jnp.floating)):
            with jax.default_matmul_precision("highest"):
                ref32 = jax.block_until_ready(ref_fn(*upcast(ref_args)))
        ref_ms, ref_err = None, math.inf
        for impl, spec in impls.items():
            row = {"case": name, "impl": impl, "ms": None, "speedup": None, "rel_err": None,
                   "note": ""}
            self.rows.append(row)
            if isinstance(spec, str):  # not applicable here, with the reason
                row["note"] = spec
                continue
            fn, args = spec
            try:
                benchlib.poison_allocator(2 * tree_nbytes(jax.eval_shape(fn, *args)))
                out = jax.block_until_ready(fn(*args))
                if ref32 is None:  # float32 inputs: the reference itself is the reference
                    ref32 = jax.block_until_ready(ref_fn(*ref_args))
                row["rel_err"] = tree_relative_error(out, ref32)
                del out
                seconds = benchlib.time_per_call(fn, args, self.repeats, self.calls)
            except Exception as e:  # one failing implementation must not end the part
                row["note"] = f"error: {type(e).__name__}: {e}"[:300]
                if impl.startswith("ours") or impl == reference:
                    self.rep.check(f"{name}: {impl} runs", False, row["note"])
                continue
            row["ms"] = seconds * 1e3
            if impl == reference:
                ref_ms = row["ms"]
            if ref_ms:
                row["speedup"] = ref_ms / row["ms"]
            nbytes = self.kv_bytes(name)
            if nbytes:
                row["kv_GBps"] = nbytes / seconds / 1e9
            if impl == reference:
                # What the reference itself loses in this dtype: a baseline, checked finite.
                ref_err = row["rel_err"]
                self.rep.check(f"{name}: {impl} finite", math.isfinite(ref_err),
                               f"rel err {sci(ref_err)} (its own rounding)")
            elif impl.startswith("ours"):
                # Our kernel may lose at most `bound`, or twice what the reference loses.
                bound = max(self.bound, 2 * ref_err) if math.isfinite(ref_err) else self.bound
                self.rep.check(f"{name}: {impl}", row["rel_err"] <= bound,
                               f"rel err {sci(row['rel_err'])} (bound {bound:.1e}; "
                               f"reference {sci(ref_err)})")
        # Compilation included: what a case costs of the part's budget.
        self.rep.results.setdefault("case_seconds", {})[name] = time.monotonic() - case_start
        self.rep.results["kernel_rows"] = self.rows
        self.rep.save()


def lora_layer_case(bench: CheckedBench, rng, name: str, slot_ids, sz, *, rank: int,
                    num_slots: int, backward: bool, interpret: bool) -> None:
    """LoRA on all 7 projections of a layer (q, k, v, o, gate, up, down), every token with
    its own adapter slot or none: the reference, our grouped kernels (tokens grouped once,
    untimed, as a step does for all its layers) and ``lax.ragged_dot``."""

    from pallas_kernels.lora import (
        group_tokens,
        lora_grouped,
        lora_multi_slot_reference,
        lora_ragged_dot,
    )
    from pallas_kernels.lora.kernel import default_tile

    dtype = jnp.dtype(sz.dtype)
    q_size, kv_size = sz.hq * sz.dh, sz.hkv * sz.dh
    dims = {"q_proj": (sz.hidden, q_size), "k_proj": (sz.hidden, kv_size),
            "v_proj": (sz.hidden, kv_size), "o_proj": (q_size, sz.hidden),
            "gate_proj": (sz.hidden, sz.intermediate), "up_proj": (sz.hidden, sz.intermediate),
            "down_proj": (sz.intermediate, sz.hidden)}
    t = len(slot_ids)

    def normal(*shape, s=1.0):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * s, dtype)

    # The projections' inputs as a layer has them: q/k/v/gate/up read the hidden state, o
    # the attention output, down the MLP activation.
    xs = {d: normal(t, d) for d in {din for din, _ in dims.values()}}
    weights = {m: (normal(num_slots, din, rank, s=0.05), normal(num_slots, rank, dout, s=0.05))
               for m, (din, dout) in dims.items()}
    scale = jnp.asarray(rng.uniform(0.5, 2.0, num_slots), jnp.float32)
    slots = jnp.asarray(np.asarray(slot_ids, np.int32))
    groups = jax.jit(group_tokens, static_argnums=(1, 2))(slots, num_slots, default_tile(t))
    cotangents = {m: normal(t, dout) for m, (_, dout) in dims.items()}

    def layer(one):  # (x, a, b) -> y for one projection, applied to all seven
        return lambda xs, w: {m: one(xs[dims[m][0]], *w[m]) for m in dims}

    impls = {
        "XLA reference": layer(lambda x, a, b: lora_multi_slot_reference(x, a, b, scale, slots)),
        "ours (grouped Pallas)": layer(lambda x, a, b: lora_grouped(
            x, a, b, scale, groups, interpret=interpret)),
        "lax.ragged_dot": layer(lambda x, a, b: lora_ragged_dot(x, a, b, scale, slots)),
    }

    def with_backward(fn):
        def run(xs, w, ct):
            out, pullback = jax.vjp(fn, xs, w)
            return out, pullback(ct)
        return run

    if backward:
        specs = {k: (jax.jit(with_backward(fn)), (xs, weights, cotangents))
                 for k, fn in impls.items()}
    else:
        specs = {k: (jax.jit(fn), (xs, weights)) for k, fn in impls.items()}
    bench.case(name, specs)


def run_kernels(rep: Report, shapes: Shapes) -> None:
    kernels_bench = importlib.import_module("kernels")
    rep.platform = device_label()
    if shapes.dry_run:
        sz = dataclasses.replace(kernels_bench.DRY_RUN, lora_slots=8)
        bound, repeats, calls, lora_tokens = 1e-5, 1, 1, (12, 40)
    else:
        # Llama-3.1-8B: decode at a long context (32 x 8192: 1 GiB of KV in bf16), a flash
        # pair at 2048 tokens, LoRA over 8 adapter slots of rank 16.
        sz = dataclasses.replace(kernels_bench.FULL, decode=(32, 8192), flash_lengths=(2048,),
                                 lora_slots=8)
        bound, repeats, calls, lora_tokens = 2e-2, 10, 5, (256, 2048)
    bandwidth, _ = measured_ceilings(rep, shapes)
    n_dec, ctx_dec = sz.decode
    itemsize = np.dtype(np.float32).itemsize if sz.dtype == "float32" else 2
    decode_kv = n_dec * ctx_dec * 2 * sz.hkv * sz.dh * itemsize  # K and V of every sequence

    def kv_bytes(case: str) -> int | None:
        return decode_kv if case.startswith("decode") else None

    bench = CheckedBench(rep, bound, repeats, calls, kv_bytes)
    rng = np.random.default_rng(0)
    rep.results["sizes"] = dataclasses.asdict(sz)
    rep.results["bound"] = bound
    kernels_bench.bench_paged_attention(bench, rng, sz)
    kernels_bench.bench_flash(bench, rng, sz)
    n_dec_tok, n_pre_tok = lora_tokens
    # Decode-like: tokens spread over 8 adapters and none; prefill/finetuning-like: runs of
    # one adapter each, one run without.
    decode_slots = rng.choice(np.arange(-1, 8), n_dec_tok)
    run = n_pre_tok // 8
    prefill_slots = np.repeat([3, -1, 0, 5, 7, 1, 2, 6], [run] * 7 + [n_pre_tok - 7 * run])
    lora_cases = [(f"LoRA 7 targets fwd, decode {n_dec_tok} tok", decode_slots, False),
                  (f"LoRA 7 targets fwd, prefill {n_pre_tok} tok", prefill_slots, False),
                  (f"LoRA 7 targets fwd+bwd, finetune {n_pre_tok} tok", prefill_slots, True)]
    if shapes.dry_run:  # the prefill case runs the decode case's code: not again on CPU
        del lora_cases[1]
    for name, slot_ids, backward in lora_cases:
        lora_layer_case(bench, rng, name, slot_ids, sz, rank=sz.lora_rank,
                        num_slots=sz.lora_slots, backward=backward, interpret=sz.interpret)

    rows = []
    for r in bench.rows:
        rows.append([r["case"], r["impl"],
                     "n/a" if r["ms"] is None else f"{r['ms']:.3f}",
                     "" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                     "" if r["rel_err"] is None else sci(r["rel_err"]),
                     f"{r['kv_GBps']:,.0f} ({r['kv_GBps'] * 1e9 / bandwidth:.0%})"
                     if "kv_GBps" in r else "", r["note"]])
    rep.table(f"Kernels vs references ({sz.dtype}; error vs float32 reference)",
              ["case", "implementation", "ms", "vs XLA", "rel err", "KV GB/s (of copy)",
               "note"], rows)
    ours = [r for r in bench.rows if r["impl"].startswith("ours") and r["rel_err"] is not None]
    worst = max((r["rel_err"] for r in ours), default=float("nan"))
    rep.target("compiled kernels within 1e-2 relative error", worst <= 1e-2,
               f"worst of ours: {sci(worst)}")
    for r in ours:
        if "kv_GBps" in r:
            share = r["kv_GBps"] * 1e9 / bandwidth
            rep.target("decode attention reads KV at >= 80% of copy bandwidth", share >= 0.8,
                       f"{r['case']}: {r['kv_GBps']:,.0f} GB/s = {share:.0%}")
        if r["case"].startswith("mixed") and r["speedup"] is not None:
            rep.target("mixed-batch attention >= 1.5x the XLA reference", r["speedup"] >= 1.5,
                       f"{r['speedup']:.2f}x")
    errors = [r for r in bench.rows if r["note"].startswith("error")]
    rep.summary = (f"{len(ours)} kernel cases, worst rel err {sci(worst)}"
                   + (f"; {len(errors)} implementations errored" if errors else ""))


# ================================================================ part 3: engine end to end


def greedy_tokens(model, kernels: str, prompts, adapters, engine_kwargs: dict,
                  max_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (request ``i`` with adapter ``names[i]``)."""
    from coserve_jax import Engine, EngineConfig, SamplingParams

    adapter_objs, names = adapters
    engine = Engine(model, EngineConfig.flat(kernels=kernels, **engine_kwargs))
    for adapter in adapter_objs:
        engine.load_adapter(adapter)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params, adapter=names[i % len(names)], admission=False)
           for i, p in enumerate(prompts)]
    results: dict[str, list[int]] = {}
    while len(results) < len(ids):
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
    return [results[i] for i in ids]


def compare_engines(rep: Report, label: str, model, kernels: str, rank: int,
                    max_tokens: int) -> None:
    """Prompts of 3 to 40 tokens in a 32-token budget (so chunks continue cached prefixes
    while other sequences decode), two adapters and the base model, greedy, through the
    kernels and through the references: the tokens must be identical."""

    cfg = model.config
    engine_kwargs = dict(page_size=16, num_pages=64, max_model_len=128, max_num_seqs=4,
                         max_num_batched_tokens=32, min_token_bucket=32, min_seq_bucket=4,
                         min_page_bucket=8, max_adapters=2, max_lora_rank=rank,
                         max_train_seqs=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, min(cfg.vocab_size, 259), n).tolist() for n in (3, 11, 26, 40)]
    adapters = random_adapters(["a", "b"], cfg, rank, seed=1)
    names = [None, "a", None, "b"]
    start = time.monotonic()
    try:
        # "highest": float32 matmuls without TF32, in XLA and in the Triton kernels alike.
        with jax.default_matmul_precision("highest"):
            ours = greedy_tokens(model, kernels, prompts, (adapters, names), engine_kwargs,
                                 max_tokens)
            ref = greedy_tokens(model, "reference", prompts, (adapters, names),
                                engine_kwargs, max_tokens)
    except Exception as e:  # recorded; the next comparison still runs
        traceback.print_exc()
        rep.results[label] = {"kernels": kernels, "identical": False,
                              "error": f"{type(e).__name__}: {e}"[:2000]}
        rep.check(f"{label}: greedy tokens identical ({kernels} vs reference)", False,
                  f"raised {type(e).__name__}: {e}"[:300])
        rep.save()
        return
    same = sum(a == b for a, b in zip(ours, ref, strict=True))
    rep.results[label] = {"kernels": kernels, "tokens": ours, "reference_tokens": ref,
                          "identical": ours == ref, "seconds": time.monotonic() - start}
    rep.check(f"{label}: greedy tokens identical ({kernels} vs reference)", ours == ref,
              f"{same}/{len(prompts)} requests identical, {max_tokens} tokens each")
    rep.save()


def run_engine(rep: Report, shapes: Shapes) -> None:
    import coserve_jax

    et = importlib.import_module("engine_throughput")
    rep.platform = device_label()
    impl = shapes.kernels_impl
    tiny = coserve_jax.load_model(coserve_jax.tiny_model_dir(), dtype="float32", progress=False)
    compare_engines(rep, "embedded model", tiny, impl, rank=8, max_tokens=8)
    if not rep.out_of_time("the 8B-shape engine comparison"):
        cfg = shapes.model_config()
        model = et.random_weight_model(cfg, jnp.dtype(jnp.float32))
        label = f"8B shapes ({cfg.num_layers} layers, random float32 weights)"
        compare_engines(rep, label, model, impl, rank=16, max_tokens=8)
    compared = {k: v for k, v in rep.results.items() if isinstance(v, dict)}
    rep.table("Greedy tokens through the kernels vs the references", [
        "model", "kernels", "result"], [
        [k, v["kernels"], "identical" if v["identical"] else v.get("error", "DIFFERENT")]
        for k, v in compared.items()])
    rep.summary = ", ".join(f"{k}: {'identical' if v['identical'] else 'DIFFERENT'}"
                            for k, v in compared.items())


# ================================================================ part 4: decode and prefill


def run_decode(rep: Report, shapes: Shapes) -> None:
    from coserve_jax import Engine

    et = importlib.import_module("engine_throughput")
    rep.platform = device_label()
    bandwidth, flops = measured_ceilings(rep, shapes)
    if shapes.dry_run:
        sizes = dataclasses.replace(et.SHAPES["tiny-8b-like"][1], decode_batches=(1, 4),
                                    decode_prompt_len=16, warm_steps=1, timed_steps=2,
                                    prefill_prompts=2, prefill_len=32,
                                    max_num_batched_tokens=64, repeats=1)
        lora_batches, rank = (4,), 8
    else:
        sizes = dataclasses.replace(et.SHAPES["llama3-8b"][1], warm_steps=2, timed_steps=10,
                                    repeats=3)
        lora_batches, rank = (16, 64), 16
    cfg = shapes.model_config()
    dtype = jnp.dtype(shapes.dtype)
    model = et.random_weight_model(cfg, dtype)
    # "auto": the compiled kernels on a GPU; on CPU the references (part 3 has run the
    # kernels through the engine; interpreting them here would only cost compile time).
    kernels = "auto"
    rep.results.update(layers=cfg.num_layers, dtype=str(dtype), kernels=kernels,
                       copy_bandwidth_Bps=bandwidth, matmul_flops=flops, decode={}, lora={})
    # 8 adapter slots of rank `rank` on all 7 targets: the same engine (and so the same
    # step program) serves the base-model and the LoRA measurements.
    engine = Engine(model, et.decode_engine_config(sizes, kernels=kernels, max_adapters=8,
                                                   max_lora_rank=rank))
    rep.results["kernels_resolved"] = engine.kernels.impl
    rng = np.random.default_rng(0)
    rows = []

    def decode_step(name: str, engine, batch: int, **kwargs) -> tuple[float, float] | None:
        """``decode_step_time``, or None after a failed check: one measurement's failure
        leaves the others' figures."""
        try:
            return et.decode_step_time(engine, batch, sizes, rng, **kwargs)
        except RuntimeError as error:
            rep.check(f"{name} measured", False, str(error))
            rep.save()
            return None

    variant_batch = lora_batches[0]

    def profile(label: str, engine, batch: int = variant_batch) -> None:
        """Where an engine's step goes: a profile of 5 more decode steps (device busy time,
        the part of it spent in memcpy kernels, the top ops, and the host's planning
        before each dispatch). On an H200, 2026-12-04, the b=16 step spent 8.0 ms of its
        14.6 ms device time copying each layer's weights out of the stacked arrays
        (``bench/layer_weights.py``); with the layers as a loop (2026-12-04, third call)
        b=16 went to 7.5 ms but b=64 stayed at 22.5 ms, which is why every batch up to 64
        is profiled."""
        before = engine.counters.copy()
        try:
            summary = step_profile.profile_steps(
                engine.step, 5, os.path.join(rep.out_dir, "profile", re.sub(r"\W+", "-", label)))
        except Exception as error:  # a comparison: its failure fails no check
            rep.note(f"profile of {label} failed: {type(error).__name__}: {error}")
            return
        delta = engine.counters - before
        summary["host_planning_per_step_s"] = delta["host_s"] / max(delta["iterations"], 1)
        rep.results.setdefault("profiles", {})[label] = summary
        busy, copies = summary["device_busy_per_step_s"], summary["memcpy_per_step_s"]
        rows.append([f"decode b={batch}, {label}, profiled (5 steps)",
                     f"{summary['wall_per_step_s'] * 1e3:.2f} ms", "",
                     ("device busy n/a (no device streams)" if busy is None else
                      f"device busy {busy * 1e3:.2f} ms, memcpy {copies * 1e3:.2f} ms")
                     + f", host planning {summary['host_planning_per_step_s'] * 1e3:.2f} ms",
                     f"{summary['device_ops_per_step']:.0f} ops"])
        if summary["top_ops"]:  # (none on the CPU backend: its ops run on host threads)
            rep.table(f"Top device ops of a b={batch} decode step: {label}",
                      ["op", "ms per step", "calls per step"],
                      [[op["name"][:80], f"{op['per_step_s'] * 1e3:.3f}",
                        f"{op['calls_per_step']:g}"] for op in summary["top_ops"]])

    for batch in sizes.decode_batches:
        if rep.out_of_time(f"decode batch {batch}"):
            break
        print(f"[decode] batch {batch} ...", flush=True)
        started = time.perf_counter()
        label = "configured engine" + ("" if batch == variant_batch else f", b={batch}")
        measured = decode_step(f"decode b={batch}", engine, batch,
                               then=(functools.partial(profile, label, batch=batch)
                                     if batch <= 64 else None))
        if measured is None:
            continue
        step, context = measured
        # The whole measurement's wall time: mostly the compiles of the batch's prefill
        # and decode buckets (the step's layers as a loop compile far slower than a scan at
        # 8B: this part measured half as much in 270 s on an H200, 2026-12-04).
        wall = time.perf_counter() - started
        print(f"[decode] batch {batch}: {step * 1e3:.2f} ms a step, measured in {wall:.0f} s",
              flush=True)
        floor = et.decode_bytes(model, batch, context) / bandwidth
        rep.results["decode"][batch] = {"step_s": step, "mean_context": context,
                                        "floor_s": floor, "floor_fraction": floor / step,
                                        "measurement_wall_s": wall}
        rows.append([f"decode b={batch} (ctx ~{context:.0f})", f"{step * 1e3:.2f} ms",
                     f"{batch / step:,.0f}", f"{floor * 1e3:.2f} ms (memory)",
                     f"{floor / step:.1%}"])
        rep.check(f"decode b={batch} measured", math.isfinite(step) and step > 0,
                  f"{step * 1e3:.2f} ms")
        if batch <= 64:
            rep.target(f"decode b={batch} at >= 80% of the memory floor", floor / step >= 0.8,
                       f"{floor / step:.1%}")
        rep.save()
    # Where the step's time goes beyond the memory floor (``KernelConfig``): the same
    # decode by an engine without adapter slots (no LoRA in the step), and by one whose
    # layers are a scan (each layer's weights copied out of the stacked arrays first on
    # XLA:GPU: 8.0 ms of a 14.6 ms step at b=16 on an H200, 2026-12-04), base-model and
    # with 8 adapters in use. (The LoRA choices were measured by the second GPU call.)
    adapters = random_adapters([f"lora{i}" for i in range(8)], cfg, rank, seed=2)
    names = [a.name for a in adapters] + [None]  # every ninth request: the base model
    if variant_batch in rep.results["decode"]:
        base_step = rep.results["decode"][variant_batch]["step_s"]
        rep.results["variants"] = {}
        for label, slots, fields in (
                ("no adapter slots", 0, {}),
                # The layer scan, a GPU's default before 2026-12-04's third call: each
                # layer's weights copied out of the stacked arrays before use.
                ("layer scan", 8, {"unroll_layers": False})):
            if rep.out_of_time(f"decode variant {label}"):
                break
            variant = Engine(model, et.decode_engine_config(
                sizes, kernels=kernels, max_adapters=slots, max_lora_rank=rank, **fields))
            for adapters_used in (False, True) if slots else (False,):
                name = f"{label}, 8 adapters in use" if adapters_used else label
                print(f"[decode] batch {variant_batch}, {name} ...", flush=True)
                if adapters_used:
                    for adapter in adapters:
                        variant.load_adapter(adapter)
                measured = decode_step(
                    f"decode b={variant_batch}, {name}", variant, variant_batch,
                    adapters=names if adapters_used else (None,),
                    then=None if adapters_used else functools.partial(profile, label))
                if measured is None:
                    continue
                step = measured[0]
                rep.results["variants"][name] = {"batch": variant_batch, "step_s": step,
                                                 "ratio_to_configured": step / base_step}
                rows.append([f"decode b={variant_batch}, {name}", f"{step * 1e3:.2f} ms",
                             f"{variant_batch / step:,.0f}", f"{step / base_step:.2f}x the "
                             "configured engine's base-model step", ""])
                rep.save()
            del variant
    for adapter in adapters:
        engine.load_adapter(adapter)
    for batch in lora_batches:
        base = rep.results["decode"].get(batch)
        if base is None or rep.out_of_time(f"LoRA decode batch {batch}"):
            continue
        print(f"[decode] batch {batch} with 8 adapters ...", flush=True)
        measured = decode_step(f"LoRA decode b={batch}", engine, batch, adapters=names)
        if measured is None:
            continue
        step = measured[0]
        added = step / base["step_s"] - 1
        rep.results["lora"][batch] = {"step_s": step, "added_fraction": added}
        rows.append([f"decode b={batch}, 8 adapters r{rank} x 7 targets",
                     f"{step * 1e3:.2f} ms", f"{batch / step:,.0f}",
                     f"+{added:.1%} over base", ""])
        rep.check(f"LoRA decode b={batch} measured", math.isfinite(step) and step > 0,
                  f"{step * 1e3:.2f} ms")
        rep.target(f"LoRA (8 adapters, 7 targets, r{rank}) adds <= 10% at b={batch}",
                   added <= 0.10, f"{added:+.1%}")
        rep.save()
    del engine
    if not rep.out_of_time("prefill"):
        print("[decode] prefill ...", flush=True)
        engine = Engine(model, et.prefill_engine_config(sizes, kernels=kernels))
        elapsed = et.prefill_time(engine, sizes, rng)
        tokens = sizes.prefill_prompts * sizes.prefill_len
        floor = et.prefill_flops(model, sizes) / flops
        rep.results["prefill"] = {"seconds": elapsed, "tokens": tokens, "floor_s": floor,
                                  "floor_fraction": floor / elapsed}
        rows.append([f"prefill {sizes.prefill_prompts}x{sizes.prefill_len} tok",
                     f"{elapsed * 1e3:.1f} ms", f"{tokens / elapsed:,.0f}",
                     f"{floor * 1e3:.1f} ms (matmul)", f"{floor / elapsed:.1%}"])
        rep.check("prefill measured", math.isfinite(elapsed) and elapsed > 0,
                  f"{elapsed * 1e3:.1f} ms")
    rep.table(f"Decode and prefill ({cfg.num_layers} layers, {dtype}, random weights, "
              f"kernels={rep.results['kernels_resolved']})",
              ["metric", "measured", "tok/s", "floor", "floor / measured"], rows)
    rep.note(f"Memory floor = (weights + KV read) / {bandwidth / 1e9:,.1f} GB/s measured copy "
             f"bandwidth; matmul floor = FLOPs / {flops / 1e12:,.2f} TFLOP/s measured. "
             f"Decode = median of {sizes.timed_steps} steady steps after {sizes.warm_steps} "
             "warm ones.")
    fractions = [f"b={b}: {v['floor_fraction']:.0%}" for b, v in rep.results["decode"].items()]
    rep.summary = "decode at " + ", ".join(fractions) + " of the memory floor" + (
        f"; prefill at {rep.results['prefill']['floor_fraction']:.0%} of the matmul floor"
        if "prefill" in rep.results else "")


# ================================================================ part 5: co-serving


def run_coserve(rep: Report, shapes: Shapes) -> None:
    """A short co-serving run at 8B shapes through ``bench/coserve.py``'s ``run_one``
    (its narrow entry point: model, mode, rate, args -> record). The TPOT target is 3x the
    decode step part 4 measured at batch 16 (the scale-free regime's default multiple)."""


    import coserve_jax

    rep.platform = device_label()
    coserve = importlib.import_module("coserve")
    run_one = getattr(coserve, "run_one", None)
    if run_one is None:
        raise RuntimeError("bench/coserve.py has no run_one(model, mode, rate, args): the "
                           "entry point this part calls is gone")
    et = importlib.import_module("engine_throughput")
    cfg = shapes.model_config()
    # The byte-level tokenizer of the embedded model (ids 3-258): the finetuning job's
    # texts need one, and any id is valid in the 8B vocabulary.
    tokenizer = coserve_jax.load_model(coserve_jax.tiny_model_dir(), progress=False).tokenizer
    model = et.random_weight_model(cfg, jnp.dtype(shapes.dtype), tokenizer=tokenizer)
    decode = (read_record(rep.out_dir, "decode") or {}).get("results", {}).get("decode", {})
    step = (decode.get("16") or decode.get("4") or {}).get("step_s")
    tpot_ms = 3 * step * 1e3 if step else (200.0 if shapes.dry_run else 45.0)
    args = argparse.Namespace(
        duration=2.0 if shapes.dry_run else 10.0, drain=2.0 if shapes.dry_run else 5.0,
        ttft_s=2.0 if not shapes.dry_run else 10.0, tpot_ms=tpot_ms, scale=0.25, seed=0,
        max_model_len=128 if shapes.dry_run else 512, tpot_multiple=3.0, arrivals="poisson",
        tier="tiny-8b-like" if shapes.dry_run else "llama3-8b")
    coserve.fit_buckets_to_tier(args)  # 8 step programs, not 72: the part has two minutes
    # The drain lets a request arriving last finish its longest output at the TPOT target
    # (on the H200, 2026-12-04, a fixed 5 s left two of co-serving's requests unfinished,
    # counted as misses, at a TPOT p99 under the target).
    coserve.fit_to_model(args)
    rate = 1.0 if shapes.dry_run else 4.0
    rep.results.update(tpot_target_ms=tpot_ms, rate=rate, duration_s=args.duration,
                       drain_s=args.drain, records=[])
    rows = []
    # A dry run checks each code path once: co-serving runs everything inference-only does.
    # finetune-only (no trace) comes last: the denominator of the share co-serving keeps.
    modes = ("coserve", "finetune-only") if shapes.dry_run else (
        "inference-only", "coserve", "finetune-only")
    for mode in modes:
        if rep.out_of_time(f"coserve mode {mode}"):
            break
        mode_rate = 0.0 if mode == "finetune-only" else rate
        print(f"[coserve] {mode} at {mode_rate:g} req/s ...", flush=True)
        started = time.monotonic()
        record = run_one(model, mode, mode_rate, args)
        print(f"[coserve] {mode}: {time.monotonic() - started:.0f} s with the engine's "
              "warmup", flush=True)
        rep.results["records"].append(record)
        rows.append([mode, f"{mode_rate:g}", f"{record['slo_attainment']:.1%}",
                     f"{record['tpot_p50_s'] * 1e3:.1f}/{record['tpot_p99_s'] * 1e3:.1f}",
                     f"{record['inference_tokens_per_s']:.0f}",
                     f"{record['ft_tokens_per_s']:.0f}"])
        if mode == "finetune-only":
            rep.check("finetune-only trained", record["ft_tokens_per_s"] > 0,
                      f"{record['ft_tokens_per_s']:.0f} tok/s, {record['steps']} steps")
        else:
            rep.check(f"{mode} served its trace",
                      record["requests"] > 0 and 0 <= record["slo_attainment"] <= 1
                      and record["unfinished"] + record["refused"] <= record["requests"],
                      f"{record['requests']} requests, {record['refused']} refused, "
                      f"{record['unfinished']} unfinished, {record['steps']} steps")
        rep.save()
    rep.table(f"Co-serving ({cfg.num_layers} layers, {shapes.dtype}, TPOT target "
              f"{tpot_ms:.1f} ms, {args.duration:g} s of Poisson trace)",
              ["mode", "rate (req/s)", "SLO attainment", "TPOT p50/p99 (ms)",
               "inference tok/s", "finetuning tok/s"], rows)
    by_mode = {r["mode"]: r for r in rep.results["records"]}
    if "coserve" in by_mode and "finetune-only" in by_mode:
        kept = by_mode["coserve"]["ft_tokens_per_s"] / max(
            by_mode["finetune-only"]["ft_tokens_per_s"], 1e-9)
        rep.results["coserve_share_of_finetune_only"] = kept
        rep.note(f"Co-serving kept {kept:.0%} of finetune-only's finetuning tokens/s at "
                 f"{rate:g} req/s (#12's GPU target: 90% at a quarter of peak, 80% at peak; "
                 "this part does not search for the peak).")
    rep.summary = "; ".join(f"{r['mode']}: {r['slo_attainment']:.0%} SLO, "
                            f"{r['ft_tokens_per_s']:.0f} ft tok/s"
                            for r in rep.results["records"] if r["mode"] != "finetune-only")
    if "coserve_share_of_finetune_only" in rep.results:
        rep.summary += f"; coserve kept {rep.results['coserve_share_of_finetune_only']:.0%} " \
                       "of finetune-only"


PART_FUNCTIONS: dict[str, Callable[[Report, Shapes], None]] = {
    "env": run_env, "kernels": run_kernels, "engine": run_engine, "decode": run_decode,
    "coserve": run_coserve,
}


def run_part(part: str, out_dir: str, budget_s: float, dry_run: bool,
             layers: int | None = None) -> int:
    """Runs one part in this process and writes its record; the exit code is 0 whenever the
    record was written (the record's status says how the part went)."""
    rep = Report(out_dir, part, budget_s, dry_run)
    rep.save()
    shapes = Shapes(dry_run=dry_run, layers=layers)
    # The engine's persistent compilation cache for every part ($COSERVE_XLA_CACHE): a
    # second run on the same machine skips compiles. A failing import is part 1's to report.
    with contextlib.suppress(ImportError):
        from coserve_jax.programs import enable_compilation_cache

        enable_compilation_cache()
    error = None
    try:
        PART_FUNCTIONS[part](rep, shapes)
    except Exception:
        traceback.print_exc()
        error = traceback.format_exc()
    # Whatever the part imported must exist on the GPU image (no registry there).
    missing, imported = imported_but_missing_on_image()
    rep.results["dependencies_missing_on_gpu_image"] = missing
    rep.check("imports nothing the GPU image lacks", not imported,
              f"imported: {', '.join(imported)}" if imported else
              f"none of {', '.join(missing) or '(nothing missing)'} imported")
    rep.save(STATUS_FAILED if error else rep.final_status(), error=error)
    return 0
