"""Every device program of the engine, jitted in this one module.

The pure functions live with what they compute (the step and the backward pieces in
``step.py``, the optimizer update in ``finetune/optim.py``, the slot write in
``lora/slots.py``); here each is jitted once, with its donation and, on a mesh, its
shardings declared together. The ``Runner`` (``runner.py``) is their only caller in
the engine.

JIT rules: every program is a pure function of arrays; every Python-level choice
(model config, kernels, whether finetuning tokens are present, piece size) is fixed
when the program is built or passed as a static argument, and array shapes come only
from buckets, so steady state never recompiles. State is donated: the KV pages, the
sampled-token feed and the finetuning buffers by the step; the finetuning buffers by
the backward pieces and whole samples; the adapter table by slot writes; a job's
weights, optimizer state and the buffers by its optimizer update.

Builders are cached on (model config, layout, kernels, ...): engines of the same
model share one jitted function, so a second engine reuses the first one's
compilations. Every program that hands device state back pins it to exactly the
sharding the step takes it in (``sharding.layout.Layout.jit_train`` and friends), on one
device too: jit's dispatch cache tells equivalent specs apart (``P()`` from
``P(None, None)``), and a state in another spec sends the next step down jit's slow path,
which re-traces it once jax's bounded trace cache has evicted it. On a mesh, the model
also gets its sharding hints and the Pallas kernels run under ``shard_map``
(``coserve_jax.sharded_kernels``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from coserve_jax.batch import TOKEN_FIELDS
from coserve_jax.config import ModelConfig
from coserve_jax.finetune.optim import OptimizerConfig, apply_update
from coserve_jax.lora.slots import write_slot_fn
from coserve_jax.model import single_adapter_lora
from coserve_jax.models import llama
from coserve_jax.step import (
    StepOutput,
    backward_block_fn,
    backward_piece_fn,
    sample_backward_fn,
    sample_forward_fn,
    sample_grads_fn,
    sample_top_fn,
    step_fn,
    step_kernels,
)
from pallas_kernels.dispatch import Kernels


def build_step(cfg: ModelConfig, return_logits: bool = False, layout=None,
               kernels: Kernels | None = None):
    """``step(params, slots, kv, train, feed, batch, with_train=...) -> (kv, train, feed,
    StepOutput)`` (``step.step_fn``), with ``kv``, ``train`` and ``feed`` donated, every
    input and output in its sharding on ``layout``'s mesh (None: one device,
    ``Layout.single``). ``kernels`` (from ``step_kernels``; None resolves the default,
    "auto") picks the attention and LoRA implementations."""
    layout = _layout(cfg, layout)
    return _build_step(cfg, return_logits, layout, _resolved(kernels, layout))


@functools.cache
def _build_step(cfg: ModelConfig, return_logits: bool, layout, kernels: Kernels):
    fn = functools.partial(step_fn, cfg, return_logits=return_logits, **_sharded(layout, kernels))
    return layout.jit_step(fn, StepOutput.specs(return_logits), TOKEN_FIELDS,
                           compiler_options=_compiler_options(kernels))


def build_backward_piece(cfg: ModelConfig, attention_block: int = 256, layout=None,
                         kernels: Kernels | None = None):
    """``backward(params, slots, train, piece, num_layers=..., seq_len=...) -> train``
    (``step.backward_piece_fn``), with ``train`` donated, laid out as ``build_step``."""
    layout = _layout(cfg, layout)
    return _build_backward_piece(cfg, attention_block, layout, _resolved(kernels, layout))


@functools.cache
def _build_backward_piece(cfg: ModelConfig, attention_block: int, layout, kernels: Kernels):
    fn = functools.partial(backward_piece_fn, cfg, attention_block=attention_block,
                           **_sharded(layout, kernels))
    return layout.jit_backward(fn, compiler_options=_compiler_options(kernels))


def check_compiler_options(options: tuple[tuple[str, object], ...]) -> tuple:
    """``options`` unchanged, once XLA has accepted them on a trivial program: an unknown
    name or a bad value is a ``ValueError`` when the engine is built, not at the first
    step's compile."""
    if options:
        try:
            jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
                jax.ShapeDtypeStruct((), jnp.float32)).compile()
        except Exception as error:  # XLA raises its own runtime error type
            raise ValueError(f"KernelConfig.xla_options {dict(options)} were refused by "
                             f"XLA: {error}") from error
    return options


def _compiler_options(kernels: Kernels) -> dict | None:
    """``jax.jit``'s ``compiler_options`` for the programs built with ``kernels``."""
    return dict(kernels.options.xla_compiler_options) or None


def _layout(cfg: ModelConfig, layout):
    if layout is not None:
        return layout
    from sharding.layout import Layout

    return Layout.single(cfg)


def _sharded(layout, kernels: Kernels) -> dict:
    """What a program built for ``layout`` is given: on a mesh of several devices the
    sharding hints and the kernels placed on the mesh; on one device neither (the plain
    single-device computation)."""
    if not layout.sharded:
        return {"kernels": kernels}
    return {"hints": layout.hints, "kernels": _on_mesh(kernels, layout)}


def build_backward_block(cfg: ModelConfig, layout=None, kernels: Kernels | None = None):
    """``block(params, slots, train, piece, seq_len=..., block=...) -> train``
    (``step.backward_block_fn``), with ``train`` donated; one compilation per (sequence
    bucket, block). Single device only."""
    if layout is not None and layout.sharded:
        raise ValueError("token-block backward pieces (FinetuneConfig.backward_block) run "
                         "on one device; a sharded engine runs whole-sequence pieces")
    return _build_backward_block(cfg, _layout(cfg, layout), _resolved(kernels, None))


@functools.cache
def _build_backward_block(cfg: ModelConfig, layout, kernels: Kernels):
    fn = functools.partial(backward_block_fn, cfg, kernels=kernels)
    return layout.jit_train(fn, ("seq_len", "block"), compiler_options=_compiler_options(kernels))


def build_sample_grads(cfg: ModelConfig, attention_block: int = 256, layout=None,
                       kernels: Kernels | None = None):
    """``sample(params, slots, train, tokens, labels, weights, slot) -> (train, loss)``
    (``step.sample_grads_fn``), with ``train`` donated; one compilation per sample-length
    bucket. Single device only: the baseline it serves is measured on one device."""
    layout = _one_device(cfg, layout, "whole-sample finetuning (temporal-seq modes) runs "
                         "on one device; use coserve or temporal:N on a mesh")
    return _build_sample_grads(cfg, attention_block, layout, _resolved(kernels, None))


@functools.cache
def _build_sample_grads(cfg: ModelConfig, attention_block: int, layout, kernels: Kernels):
    fn = functools.partial(sample_grads_fn, cfg, attention_block=attention_block,
                           kernels=kernels)
    return layout.jit_train(fn, (), with_loss=True, compiler_options=_compiler_options(kernels))


class SamplePartPrograms(NamedTuple):
    """The three programs of a sample run in parts (``runner_commands.RunSamplePart``)."""

    forward: Callable
    """``(params, slots, h | None, tokens, slot, first_layer, num_layers=) -> (h, pullback)``
    (``step.sample_forward_fn``): nothing donated, no engine state out."""
    top: Callable
    """``(params, slots, train, h, labels, weights, slot, first_layer, num_layers=) ->
    (train, (loss, dh))`` (``step.sample_top_fn``), ``train`` donated."""
    backward: Callable
    """``(params, slots, train, pullback, dh, slot, first_layer) -> (train, dh_in)``
    (``step.sample_backward_fn``), ``train`` donated."""


def build_sample_parts(cfg: ModelConfig, attention_block: int = 256, layout=None,
                       kernels: Kernels | None = None) -> SamplePartPrograms:
    """The programs of a sample run in parts; one compilation of each per sample-length
    bucket and segment size. Single device, as whole samples."""
    layout = _one_device(cfg, layout, "samples run in parts on one device; use "
                         "finetune_unit='tokens' on a mesh")
    return _build_sample_parts(cfg, attention_block, layout, _resolved(kernels, None))


def _one_device(cfg: ModelConfig, layout, refusal: str):
    """``layout`` (None: ``Layout.single``), or ``ValueError(refusal)`` when it is sharded."""
    if layout is not None and layout.sharded:
        raise ValueError(refusal)
    return _layout(cfg, layout)


@functools.cache
def _build_sample_parts(cfg: ModelConfig, attention_block: int, layout, kernels: Kernels):
    options = _compiler_options(kernels)
    forward = jax.jit(functools.partial(sample_forward_fn, cfg, attention_block=attention_block,
                                        kernels=kernels),
                      static_argnames=("num_layers",), compiler_options=options)
    top = layout.jit_train(functools.partial(sample_top_fn, cfg, attention_block=attention_block,
                                             kernels=kernels),
                           ("num_layers",), with_loss=True, compiler_options=options)
    backward = layout.jit_train(functools.partial(sample_backward_fn, cfg), (),
                                with_loss=True, compiler_options=options)
    return SamplePartPrograms(forward, top, backward)


@functools.cache
def build_write_slot(layout):
    """``write(slots, index, a, b, scale) -> slots`` (``lora.slots.write_slot_fn``): one slot
    rewritten in place, the table donated; its shapes never change, so it compiles once."""
    return layout.jit_state(write_slot_fn, donate_argnums=(0,))


@functools.cache
def build_optimizer_update(optimizer: OptimizerConfig, total_steps: int, rank: int,
                           table_modules: tuple[str, ...], targets: tuple[str, ...], layout):
    """``update(params, opt_state, train, slot, num_seqs) -> (params, opt_state, train,
    padded, grad_norm)`` (``finetune.optim.apply_update``), with the job's weights, its
    optimizer state and the buffers donated. Shared by jobs of the same shape and
    optimizer: compiled once."""
    fn = functools.partial(apply_update, optimizer.build(total_steps), rank, table_modules,
                           targets)
    return layout.jit_state(fn, donate_argnums=(0, 1, 2))


@functools.cache
def build_optimizer_init(optimizer: OptimizerConfig, total_steps: int, layout):
    """``init(params) -> opt_state`` of the job's optax transform, laid out like the
    weights."""
    return layout.jit_state(optimizer.build(total_steps).init)


@jax.jit
def slot_grads(train, slot) -> dict:
    """Accumulated LoRA gradients of one slot, partial sums added: module -> (A [L, in, R],
    B [L, R, out]) float32 (one program, not one per array)."""
    def one(g: jax.Array) -> jax.Array:
        g = jnp.take(g, slot, axis=g.ndim - 3)
        return g if g.ndim == 3 else jnp.sum(g, axis=0)

    return {m: (one(train.grad_a[m]), one(train.grad_b[m])) for m in train.grad_a}


@functools.partial(jax.jit, static_argnums=0)
def forward_dense(cfg: ModelConfig, params, tokens, adapter_weights, scale):
    """The plain whole-sequence forward (``llama.forward_dense``) with one adapter on every
    token: what ``model.forward_logits`` runs (no cache, no engine state)."""
    return llama.forward_dense(cfg, params, tokens, adapter_weights, single_adapter_lora(scale))


def _resolved(kernels: Kernels | None, layout) -> Kernels:
    """The builders' cache key: a resolved ``Kernels``."""
    if kernels is None:
        return step_kernels(None, layout)
    if layout is not None and layout.sharded and kernels.impl == "tpu":
        raise ValueError("a sharded step cannot run jax's TPU kernels (they are not placed "
                         "under shard_map); resolve kernels with step_kernels(impl, layout)")
    return kernels


def _on_mesh(kernels: Kernels, layout):
    """What a sharded program calls: the Pallas kernels under ``shard_map`` on the layout's
    mesh; the references as they are (GSPMD partitions them)."""
    if not kernels.uses_pallas:
        return kernels
    from coserve_jax.sharded_kernels import ShardedKernels

    return ShardedKernels(kernels, layout)


_cache_enabled = False
_cache_disabled = False


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache (once per process); returns its directory,
    or None when this process keeps it off (``disable_compilation_cache``)."""
    global _cache_enabled
    if _cache_disabled:
        return None
    path = path or os.environ.get("COSERVE_XLA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "coserve_jax", "xla"
    )
    if not _cache_enabled:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _cache_enabled = True
    return jax.config.jax_compilation_cache_dir


def disable_compilation_cache() -> None:
    """Keeps this process from writing or reading the persistent compilation cache (engines
    built afterwards compile in memory only). Call before the first engine is built."""
    global _cache_disabled
    if _cache_enabled:
        raise RuntimeError("the persistent compilation cache is already on in this process")
    _cache_disabled = True

