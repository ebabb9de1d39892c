"""The engine's step and backward pieces through the Pallas kernels (interpret mode on CPU)
give what the jnp references give: the same greedy tokens, the same LoRA gradients.

The kernel path is picked once, when the engine is built (``KernelConfig.impl``).
Interpret mode is slow, so the engines here compile one or two small buckets each.
"""

from __future__ import annotations

import argparse
import logging
import types

import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, SamplingParams
from coserve_jax import step as step_module
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.programs import build_step
from coserve_jax.step import REFERENCE_KERNELS, BackwardPiece, step_kernels
from pallas_kernels.dispatch import ENV_VAR, KernelOptions, Kernels
from pallas_kernels.ragged_paged_attention import flash
from pallas_kernels.ragged_paged_attention import kernel as rpa_kernel
from server.commands import engine_config_from_args
from sharding.layout import Layout

from support import (
    engine_grads,
    random_adapter,
    random_sequence,
    relative_error,
    tiny_model,
    whole_sequence_grads,
)

PAGE_SIZE = 8


def serving_config(kernels: str, **fields) -> EngineConfig:
    """One bucket (32 tokens, 4 sequences, 8 pages), two adapter slots, no finetuning."""
    return EngineConfig.flat(kernels=kernels, page_size=PAGE_SIZE, num_pages=48, max_model_len=64,
                             max_num_seqs=4, max_num_batched_tokens=32, min_token_bucket=32,
                             min_seq_bucket=4, min_page_bucket=8, max_adapters=2, max_lora_rank=8,
                             max_train_seqs=0, **fields)


def serve(kernels: str, **fields) -> tuple[dict[str, list[int]], list[np.ndarray], str]:
    """Greedy tokens of a mixed batch, the logits of the real sequences of every step, and
    the jaxpr of the first step. ``fields``: more of the engine's config."""
    model = tiny_model()
    cfg = model.config
    engine = Engine(model, serving_config(kernels, **fields))
    assert engine.kernels.impl == kernels
    assert engine.runner.step is build_step(cfg, kernels=engine.kernels)
    engine.load_adapter(random_adapter("a4", cfg, 4, 1))
    engine.load_adapter(random_adapter("a8", cfg, 8, 2))
    # The same program as the engine's, built to return logits too; cached per kernels.
    step = build_step(cfg, return_logits=True, kernels=engine.kernels)
    logits, jaxprs = [], []

    def recording_step(params, slots, kv, train, feed, batch, **static):
        if not jaxprs:
            jaxprs.append(str(step.trace(params, slots, kv, train, feed, batch,
                                         **static).jaxpr))
        kv, train, feed, out = step(params, slots, kv, train, feed, batch, **static)
        real = np.unique(np.asarray(batch.seq_ids)[np.asarray(batch.token_mask)])
        logits.append(np.asarray(out.logits)[real])
        return kv, train, feed, out

    engine.runner.step = recording_step
    rng = np.random.default_rng(0)
    # Prompts of 3 to 40 tokens: the longest is prefilled in chunks (32-token budget), so
    # chunks continue cached prefixes while the others decode. Adapters on some requests.
    ids = {}
    for n, adapter in ((3, None), (11, "a4"), (26, None), (40, "a8")):
        prompt = rng.integers(3, cfg.vocab_size, n).tolist()
        ids[engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True),
                               adapter=adapter, admission=False)] = n
    tokens = {}
    while len(tokens) < len(ids):
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.output_token_ids
    return tokens, logits, jaxprs[0]


def test_coserving_step_kernels_give_the_references_greedy_tokens(caplog):
    ref_tokens, ref_logits, ref_jaxpr = serve("reference")
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        tokens, logits, jaxpr = serve("interpret")
    # The kernels ran (no shape fell back to a reference), and only on the kernel path.
    assert "pallas_call" in jaxpr and "pallas_call" not in ref_jaxpr
    assert "falling back" not in caplog.text
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert np.isfinite(ours).all()
        assert relative_error(ours, ref) <= 1e-5


def test_dense_lora_without_the_conditional_gives_the_references_greedy_tokens():
    """The LoRA choices measured on a GPU (``KernelConfig.dense_lora``, ``skip_unused_lora``):
    the masked einsum over every slot, run on every step (no ``lax.cond``), beside the
    kernels' attention, gives what the references give; the default skips by a conditional."""
    ref_tokens, ref_logits, ref_jaxpr = serve("reference")
    tokens, logits, jaxpr = serve("interpret", dense_lora=True, skip_unused_lora=False)
    # One conditional per LoRA target in the layer scan's body is gone (the sampler keeps
    # its own, which skips the vocabulary sort in greedy batches).
    assert ref_jaxpr.count("cond[") - jaxpr.count("cond[") == len(ALL_TARGETS)
    assert "pallas_call" in jaxpr  # the attention kernel
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert relative_error(ours, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["interpret", "reference"])
def test_finetuning_gradients_through_the_kernels(impl, caplog):
    """The flash pair in the backward pieces and grouped LoRA in the forward windows give
    the whole-sequence gradients, inference tokens (with and without the adapter) mixed in."""
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(30), 30)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        adapter, got, engine = engine_grads(model, seq, window=16, backward_layers=2,
                                            serve=True, block=16, kernels=impl)
    assert engine.kernels.impl == impl and "falling back" not in caplog.text
    piece = BackwardPiece(act_row=np.int32(0), layer_start=np.int32(0), length=np.int32(30),
                          adapter_slot=np.int32(0))
    runner = engine.runner
    traced = runner.backward_program().trace(model.params, runner.slots, runner.train, piece,
                                             num_layers=2, seq_len=32)
    assert ("pallas_call" in str(traced.jaxpr)) == (impl == "interpret")
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")


def test_bad_kernels_value_is_refused():
    with pytest.raises(ValueError, match=r"KernelConfig\.impl must be one of .*'interpret'"):
        EngineConfig.flat(kernels="fast")
    with pytest.raises(ValueError, match=r"KernelConfig\.impl"):
        engine_config_from_args(argparse.Namespace(config=None, run_dir=None, kernels="fast"))
    config = engine_config_from_args(argparse.Namespace(config=None, run_dir=None,
                                                        kernels="interpret"))
    assert config.kernels.impl == "interpret"


def test_xla_options_reach_the_step_and_change_nothing_it_computes():
    """``KernelConfig.xla_options`` go to the step's ``jax.jit`` (here cuBLAS GEMMs asked
    for, which the CPU backend ignores): the same tokens and logits as without."""
    ref_tokens, ref_logits, _ = serve("reference")
    option = "xla_gpu_enable_triton_gemm=false"
    tokens, logits, _ = serve("reference", xla_options=option)
    engine = Engine(tiny_model(), serving_config("reference", xla_options=option))
    assert engine.kernels.options.xla_compiler_options == (("xla_gpu_enable_triton_gemm", False),)
    assert engine.runner.step.compiler_options == {"xla_gpu_enable_triton_gemm": False}
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert relative_error(ours, ref) == 0.0


def test_layers_as_a_loop_compute_what_the_scan_computes():
    """``KernelConfig.unroll_layers`` (a GPU's default): the step's layers as a Python loop
    (every layer's weights a static slice of the stacked arrays) give the scan's tokens
    and logits."""
    ref_tokens, ref_logits, ref_jaxpr = serve("reference")
    tokens, logits, jaxpr = serve("reference", unroll_layers=True)
    assert ref_jaxpr.count("scan[") - jaxpr.count("scan[") == 1  # the layer scan is gone
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert relative_error(ours, ref) <= 1e-6
    # Left to the backend: a loop on a GPU ("kernel"), the scan elsewhere.
    assert KernelOptions().for_impl("kernel").unroll_layers is True
    for impl in ("tpu", "reference", "interpret"):
        assert KernelOptions().for_impl(impl).unroll_layers is False


def test_bad_xla_options_are_refused_before_serving():
    with pytest.raises(ValueError, match=r"xla_options: expected 'xla_name=value'.*'fast'"):
        serving_config("reference", xla_options="fast")
    with pytest.raises(ValueError, match=r"xla_options .*refused by XLA.*xla_no_such_option"):
        Engine(tiny_model(), serving_config("reference", xla_options="xla_no_such_option=1"))
    config = serving_config("reference", xla_options=" xla_a=true, xla_b=3,xla_c=0.5,xla_d=x ")
    assert config.kernels.compiler_options() == (
        ("xla_a", True), ("xla_b", 3), ("xla_c", 0.5), ("xla_d", "x"))


def test_kernel_path_on_cpu_fails_at_engine_build():
    with pytest.raises(ValueError, match=r"'kernel' needs a GPU or TPU.*'interpret'"):
        Engine(tiny_model(), serving_config("kernel"))


def test_kernels_resolved_once_and_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "interpret")
    assert step_kernels("auto").impl == "interpret"
    assert step_kernels("reference").impl == "reference"  # an explicit choice wins
    monkeypatch.delenv(ENV_VAR)
    assert step_kernels("auto").impl == "reference"  # CPU
    cfg = tiny_model().config
    # The resolved implementation is part of the builders' cache key.
    assert build_step(cfg, kernels=step_kernels("interpret")) is build_step(
        cfg, kernels=step_kernels("interpret"))
    assert build_step(cfg, kernels=step_kernels("interpret")) is not build_step(
        cfg, kernels=REFERENCE_KERNELS)


def test_sharded_steps_resolve_the_kernels(monkeypatch, caplog):
    """With a layout the Pallas kernels are kept (the sharded builders run them under
    shard_map; tests/test_sharding.py checks the numbers); "auto" is still the references
    on CPU and "kernel" still needs an accelerator. jax's TPU kernels are not placed under
    shard_map: a sharded TPU step runs the references and says so."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    layout = types.SimpleNamespace(sharded=True)  # only its being sharded matters here
    single = Layout.single(tiny_model().config)
    assert step_kernels("interpret", layout) == step_kernels("interpret")
    assert step_kernels("interpret", layout).impl == "interpret"
    assert step_kernels("auto", layout) == REFERENCE_KERNELS
    with pytest.raises(ValueError, match=r"'kernel' needs a GPU or TPU"):
        step_kernels("kernel", layout)
    monkeypatch.setattr(step_module, "select_kernels",
                        lambda impl, options=None: Kernels(impl="tpu"))
    assert step_kernels("auto").impl == "tpu"
    assert step_kernels("auto", single).impl == "tpu"  # one device: the kernels as they are
    with caplog.at_level(logging.INFO, logger="coserve_jax.step"):
        assert step_kernels("auto", layout) == REFERENCE_KERNELS
    assert "not placed under shard_map" in caplog.text
    with pytest.raises(ValueError, match="TPU kernels"):
        build_step(tiny_model().config, layout=layout, kernels=Kernels(impl="tpu"))


def test_the_tiny_model_takes_the_kernel_path():
    """Otherwise the tests above would compare the references with themselves."""
    cfg = tiny_model().config
    assert cfg.num_heads > cfg.num_kv_heads  # GQA
    assert rpa_kernel.kernel_supports(cfg.head_dim, PAGE_SIZE)
    assert rpa_kernel.kernel_supports(cfg.head_dim, 4)  # engine_grads' page size
    assert flash.flash_supports(cfg.head_dim)
