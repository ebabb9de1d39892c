"""Chooses, once at build time, which attention and LoRA implementations a step uses.

``select_kernels(impl)`` returns a ``Kernels`` bundle of plain callables:

- ``impl="auto"`` (default; the ``COSERVE_KERNELS`` environment variable overrides it):
  the Pallas kernels on GPU; on TPU jax's own TPU ragged paged attention kernel (through
  ``ragged_paged_attention/tpu.py``; the KV cache is in that kernel's layout, so it is
  handed over uncopied),
  ``lax.ragged_dot`` for LoRA and the fallback for dense causal attention; the jnp
  references on CPU;
- ``"kernel"``: the Pallas kernels, compiled (GPU; on TPU the TPU choices above);
- ``"reference"``: the jnp references everywhere (the fallback); for paged attention over
  many sequences, the reference's function in a formulation that scores each token only
  against its own sequence (``ragged_paged_attention/xla.py``);
- ``"interpret"``: the Pallas kernels in interpret mode (CPU tests of the kernel path).

Shapes a kernel cannot tile (e.g. a head size that is not a power of two) fall back to
the reference for that call, decided at trace time from static shapes, with a warning.

The step should compute per-batch metadata once and reuse it in every layer:
``kernels.plan_paged_attention(...)`` and ``kernels.multi_slot_lora(...)`` do that.
The kernels here are single-device programs: a sharded step (``sharding.layout``) runs
them inside ``shard_map`` (``coserve_jax/sharded_kernels.py``), each device on its own
heads and tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.lora import kernel as lora_kernel
from pallas_kernels.lora.reference import lora_multi_slot_reference, lora_single_reference
from pallas_kernels.ragged_paged_attention import flash
from pallas_kernels.ragged_paged_attention import kernel as rpa_kernel
from pallas_kernels.ragged_paged_attention.reference import (
    dense_causal_attention_reference,
)
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla

log = logging.getLogger(__name__)

IMPLS = ("auto", "kernel", "reference", "interpret")
ENV_VAR = "COSERVE_KERNELS"

# (q, kv_pages, page_tables, seq_ids, positions, scale=None, *, layer=None) -> [T, Hq, Dh];
# kv_pages [P, page_size, 2 * Hkv, Dh] (K of head h at 2h, V at 2h + 1), or [L, P, ...]
PagedAttentionFn = Callable[..., jax.Array]
# (q [B, L, Hq, Dh], k, v) -> [B, L, Hq, Dh], differentiable
CausalAttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (x [T, in], a [N, in, R], b [N, R, out], scale [N], slot_ids [T]) -> [T, out]
MultiLoraFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Tile sizes (None: the kernels' defaults) and Triton launch settings."""

    attention_block_q: int | None = None
    attention_pages_per_block: int | None = None
    flash_block_q: int | None = None
    flash_block_k: int | None = None
    lora_tile: int | None = None
    lora_block: int = 128
    num_warps: int | None = None
    num_stages: int | None = None
    dense_lora: bool | None = None
    """Multi-slot LoRA as the reference's masked einsum over every slot on every path,
    instead of the grouped kernel (GPU) or ``lax.ragged_dot`` (TPU). None: by backend
    (``Kernels``), True on a GPU. On an H200 at 8B shapes, 2026-12-04, the einsum
    took 0.09 ms a layer for 7 targets at 256 decode tokens, against 0.21 ms for the
    grouped kernel; a whole b=16 decode step with 8 adapters in use took 14.7 ms with the
    einsum and 18.9 ms with the grouped kernel (neither behind the conditional)."""
    skip_unused_lora: bool | None = None
    """Skip the step's LoRA with a run-time conditional when no token names a slot. None:
    by backend (``Kernels``), off on a GPU. On XLA:GPU each conditional copies its
    predicate to the host first: on an H200 at 8B shapes, 2026-12-04, a b=16 decode step
    with 8 empty slots took 17.7 ms with the conditional (and the grouped kernel) against
    15.3 ms with the einsum always run, and with 8 adapters in use 25.0 ms against 14.7."""

    unroll_layers: bool | None = None
    """The co-serving step's layers as a loop instead of a scan: each layer's weights are
    then a static slice of the stacked arrays, which XLA reads in place, where a scan's
    dynamic slice is copied out first on XLA:GPU. None: by backend (``Kernels``), on a
    GPU only. On an H200 at 8B shapes, 2026-12-04, the copies took 8.0 ms of a 14.6 ms
    b=16 decode step; the 32 layers alone took 11.96 ms as a scan and 4.36 ms as a loop
    (at the weights' memory floor), against 5.58 ms for the best XLA option tried (cuBLAS
    GEMMs with dynamic-slice fusion), and the engine's b=16 decode step 7.46 ms against
    15.26 ms. The cost is compile time: 32 layer bodies instead of one, each with its
    own attention kernel (several times slower per program at 8B, not yet measured
    exactly; the persistent compilation cache pays it once per machine)."""
    xla_compiler_options: tuple[tuple[str, bool | int | float | str], ...] = ()
    """XLA options the step and the training programs are compiled with (``jax.jit``'s
    ``compiler_options``), as (name, value) pairs: for example
    ``(("xla_gpu_enable_triton_gemm", False),)`` for cuBLAS GEMMs instead of Triton ones
    (``bench/layer_weights.py`` measures why one might)."""

    def for_impl(self, impl: str) -> KernelOptions:
        """These options with the LoRA choices left None decided for ``impl``: on a GPU
        ("kernel"), the einsum on every step and the layers as a loop (measured above);
        elsewhere the grouped or ragged LoRA behind the conditional (on CPU and TPU a
        conditional does not wait on the host) and the layer scan (one layer body to
        compile; no measurement yet says a loop is faster there)."""
        on_gpu = impl == "kernel"
        return dataclasses.replace(
            self,
            dense_lora=on_gpu if self.dense_lora is None else self.dense_lora,
            skip_unused_lora=(not on_gpu if self.skip_unused_lora is None
                              else self.skip_unused_lora),
            unroll_layers=on_gpu if self.unroll_layers is None else self.unroll_layers)


def requested_impl(impl: str | None = None) -> str:
    """What was asked for, before looking at the backend: ``impl``, except that None and
    ``"auto"`` defer to ``COSERVE_KERNELS`` when it is set."""
    from_env = impl in (None, "auto") and bool(os.environ.get(ENV_VAR))
    if from_env:
        impl = os.environ[ENV_VAR]
    impl = impl or "auto"
    if impl not in IMPLS:
        where = f" (from ${ENV_VAR})" if from_env else ""
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}{where}")
    return impl


def resolve_impl(impl: str | None = None, backend: str | None = None) -> str:
    """The concrete path: ``"kernel"``, ``"tpu"``, ``"reference"`` or ``"interpret"``."""
    impl = requested_impl(impl)
    backend = backend or jax.default_backend()
    on_gpu = backend in ("gpu", "cuda", "rocm")
    if impl == "auto":
        return "kernel" if on_gpu else "tpu" if backend == "tpu" else "reference"
    if impl == "kernel":
        if backend == "tpu":
            return "tpu"
        if not on_gpu:
            raise ValueError(f"kernel impl 'kernel' needs a GPU or TPU (backend is "
                             f"{backend!r}); use 'interpret' to run the kernels on CPU, or "
                             "'reference'")
    return impl


def _warn_fallback(what: str, why: str) -> None:
    log.warning("%s: falling back to the jnp reference (%s)", what, why)


@functools.cache
def _tpu_kernel_available() -> bool:
    """Whether this jax still ships the TPU ragged paged attention kernel."""
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (  # noqa: F401
            ragged_paged_attention,
        )
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementations a step was built with. All fields are pure functions."""

    impl: str
    """What was chosen: "kernel", "tpu", "reference" or "interpret"."""
    options: KernelOptions = KernelOptions()
    """Tile sizes and the LoRA choices; those left None are decided for ``impl`` here."""

    def __post_init__(self):
        object.__setattr__(self, "options", self.options.for_impl(self.impl))

    @property
    def uses_pallas(self) -> bool:
        return self.impl in ("kernel", "interpret")

    @property
    def _interpret(self) -> bool:
        return self.impl == "interpret"

    # ---- ragged paged attention (the step's forward over paged KV) ----

    def paged_attention(self, q, kv_pages, page_tables, seq_ids, positions,
                        scale=None, *, layer=None, metadata=None) -> jax.Array:
        """Drop-in for ``ragged_paged_attention_reference`` (plus ``layer``: pass the
        stacked ``[L, P, ...]`` cache and the layer index, so no layer copy is made)."""
        dh, page_size = q.shape[-1], kv_pages.shape[-3]
        if self.uses_pallas and rpa_kernel.kernel_supports(dh, page_size):
            o = self.options
            return rpa_kernel.ragged_paged_attention(
                q, kv_pages, page_tables, seq_ids, positions, scale, layer=layer,
                metadata=metadata, block_q=o.attention_block_q,
                pages_per_block=o.attention_pages_per_block, interpret=self._interpret,
                num_warps=o.num_warps, num_stages=o.num_stages)
        if self.impl == "tpu" and _tpu_kernel_available():
            from pallas_kernels.ragged_paged_attention import tpu

            hq, hkv = q.shape[-2], kv_pages.shape[-2] // 2
            if tpu.tpu_kernel_supports(dh, hq, hkv, q.dtype, kv_pages.dtype):
                return tpu.tpu_ragged_paged_attention(q, kv_pages, page_tables, seq_ids,
                                                      positions, scale, layer=layer)
            _warn_fallback("ragged paged attention (TPU kernel)",
                           f"head_dim {dh}, {hq} query / {hkv} kv heads, {kv_pages.dtype}")
        if self.uses_pallas:
            _warn_fallback("ragged paged attention", f"head_dim {dh}, page_size {page_size}")
        elif self.impl == "tpu" and not _tpu_kernel_available():
            _warn_fallback("ragged paged attention", "this jax has no TPU ragged kernel")
        if layer is not None:
            kv_pages = kv_pages[layer]
        # The reference's function, in the formulation cheaper for this batch shape.
        return ragged_paged_attention_xla(q, kv_pages, page_tables, seq_ids, positions,
                                          scale)

    def plan_paged_attention(self, seq_ids: jax.Array, positions: jax.Array,
                             page_tables: jax.Array, *, num_q_per_kv: int,
                             page_size: int) -> PagedAttentionFn:
        """Computes the batch's block layout once (call it in the step, outside the layer
        scan) and returns a ``PagedAttentionFn`` for that batch: the last three positional
        arguments it receives must be this batch's (they are ignored by the kernel)."""
        metadata = self.attention_metadata(seq_ids, positions, page_tables,
                                           num_q_per_kv=num_q_per_kv, page_size=page_size)
        if metadata is None:
            return self.paged_attention
        return functools.partial(self.paged_attention, metadata=metadata)

    def attention_metadata(self, seq_ids: jax.Array, positions: jax.Array,
                           page_tables: jax.Array, *, num_q_per_kv: int,
                           page_size: int) -> rpa_kernel.RaggedAttentionMetadata | None:
        """The batch's block layout for ``paged_attention(..., metadata=)`` (None on paths
        that do not use one). ``plan_paged_attention`` binds it; a sharded step computes
        it per data shard."""
        if not self.uses_pallas:
            return None
        o = self.options
        block_q = o.attention_block_q or rpa_kernel.default_block_q(
            num_q_per_kv, seq_ids.shape[0], page_tables.shape[0])
        ppb = o.attention_pages_per_block or rpa_kernel.default_pages_per_block(page_size)
        return rpa_kernel.ragged_attention_metadata(
            seq_ids, positions, page_tables, block_q=block_q, pages_per_block=ppb)

    # ---- dense causal attention (the finetuning backward pieces) ----

    def causal_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         scale: float | None = None) -> jax.Array:
        """Causal GQA self-attention ``[B, L, Hq, Dh]``, differentiable; the flash pair on
        the kernel paths (the backward recomputes softmax from the saved logsumexp)."""
        if self.uses_pallas and flash.flash_supports(q.shape[-1]):
            o = self.options
            return flash.flash_causal_attention(
                q, k, v, scale, block_q=o.flash_block_q, block_k=o.flash_block_k,
                interpret=self._interpret, num_warps=o.num_warps, num_stages=o.num_stages)
        if self.uses_pallas:
            _warn_fallback("flash attention", f"head_dim {q.shape[-1]}")
        return dense_causal_attention_reference(q, k, v, scale)

    def attention_fn(self, fallback: Callable | None = None) -> Callable:
        """An ``AttentionFn`` (``coserve_jax.models.llama``) over whole sequences,
        ``(layer, q, k, v, carry) -> (out, carry)``, for the backward pieces' ``run_layers``.

        On the kernel paths it runs the flash pair; otherwise (and for shapes the kernel
        cannot tile) it returns ``fallback`` when given - pass the step's current
        ``llama.blocked_attention(block)``, whose backward holds one query block's scores
        rather than the dense reference's ``[L, L]``."""

        def attention(layer, q, k, v, carry):
            if fallback is not None and not (self.uses_pallas
                                             and flash.flash_supports(q.shape[-1])):
                return fallback(layer, q, k, v, carry)
            return self.causal_attention(q, k, v), carry

        return attention

    # ---- multi-slot LoRA ----

    def lora_multi_slot(self, x, a, b, scale, slot_ids) -> jax.Array:
        """Drop-in for ``lora_multi_slot_reference`` (groups tokens on every call)."""
        groups = self.group_tokens(slot_ids, a.shape[0], x.shape[0])
        return self.lora_grouped(x, a, b, scale, slot_ids, groups)

    def group_tokens(self, slot_ids: jax.Array, num_slots: int,
                     num_tokens: int) -> lora_kernel.TokenGroups | None:
        """The per-step grouping of tokens by slot (None on paths that do not use it)."""
        if not self.uses_pallas or self.options.dense_lora:
            return None
        tile = self.options.lora_tile or lora_kernel.default_tile(num_tokens)
        return lora_kernel.group_tokens(slot_ids, num_slots, tile)

    def lora_grouped(self, x, a, b, scale, slot_ids, groups) -> jax.Array:
        """Multi-slot LoRA with a grouping from ``group_tokens`` (reused across layers)."""
        if self.options.dense_lora:
            return lora_multi_slot_reference(x, a, b, scale, slot_ids)
        if self.uses_pallas:
            o = self.options
            return lora_kernel.lora_grouped(
                x, a, b, scale, groups, block_k=o.lora_block, block_n=o.lora_block,
                interpret=self._interpret, num_warps=o.num_warps, num_stages=o.num_stages)
        if self.impl == "tpu":
            return lora_kernel.lora_ragged_dot(x, a, b, scale, slot_ids)
        return lora_multi_slot_reference(x, a, b, scale, slot_ids)

    def multi_slot_lora(self, scale: jax.Array, slot_ids: jax.Array):
        """The step's ``LoraFn`` ``(layer_adapter, module, x) -> delta | None`` for the
        ragged batch: each token uses its own slot (or none, ``slot_ids < 0``). Tokens are
        grouped once here (call it in the step, outside the layer scan). When no token
        names a slot the LoRA work is skipped at run time (``lax.cond``), so base-model
        traffic pays nothing for the slot table, unless ``options.skip_unused_lora`` is
        off (the conditional's own cost on a GPU: ``KernelOptions``)."""
        any_adapter = jnp.any(slot_ids >= 0)
        groups = self.group_tokens(slot_ids, scale.shape[0], slot_ids.shape[0])

        def lora(la, module, x):
            if la is None or module not in la:
                return None
            a, b = la[module]
            return self.unless_unused(
                any_adapter, lambda: self.lora_grouped(x, a, b, scale, slot_ids, groups),
                (*x.shape[:-1], b.shape[-1]), x.dtype)

        return lora

    def unless_unused(self, any_adapter: jax.Array, delta: Callable[[], jax.Array],
                      shape: tuple[int, ...], dtype) -> jax.Array:
        """``delta()``, skipped at run time for zeros of ``shape`` when ``any_adapter`` is
        false (no token names a slot), unless ``options.skip_unused_lora`` is off."""
        if not self.options.skip_unused_lora:
            return delta()
        return jax.lax.cond(any_adapter, delta, lambda: jnp.zeros(shape, dtype))

    @staticmethod
    def lora_single(x, a, b, scale) -> jax.Array:
        """One adapter for all tokens: two dense matmuls, which XLA does well anywhere."""
        return lora_single_reference(x, a, b, scale)


def select_kernels(impl: str | None = None, options: KernelOptions | None = None,
                   backend: str | None = None) -> Kernels:
    """The attention and LoRA implementations for this process's backend; call once when
    the step is built. ``impl``: "auto" | "kernel" | "reference" | "interpret" (None and
    "auto" defer to ``COSERVE_KERNELS`` when it is set)."""
    return Kernels(impl=resolve_impl(impl, backend), options=options or KernelOptions())
