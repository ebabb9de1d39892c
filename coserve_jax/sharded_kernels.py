"""The Pallas kernels of a sharded step, each run inside ``jax.shard_map`` on the layout's mesh.

A Pallas kernel is a single-device program: GSPMD cannot split a ``pallas_call``, so left
to itself it would gather every operand onto every device. ``ShardedKernels`` wraps a
kernel ``Kernels`` bundle (``pallas_kernels.dispatch``) so that each call runs per device
on that device's part of the layout (``sharding.layout``), and offers the same methods
the step and the backward pieces call:

- **Paged attention** (the step): heads are independent, so each device attends with its
  own query heads over its own KV heads, and with its data shard's tokens (the KV pages
  are replicated across ``data``). The block layout (``attention_metadata``) is computed
  once per step per data shard. With fewer KV heads than the model axis the pages are
  replicated (GQA, as the layout does): each device then reads the KV heads its query
  heads use, which costs a copy of those heads of the layer's pages per layer (noted in
  the log when the step is built).
- **Flash attention** (the backward pieces): the same head split over whole sequences;
  the sequence's tokens are gathered across ``data`` for it (causal attention of a query
  needs every earlier key), so data replicas compute it redundantly.
- **Multi-slot LoRA** (the step) follows the dependent layout: for a column-parallel
  projection x and A are replicated on ``model`` and B is split on its output columns,
  so each device's ``(x A) B_d`` is its columns of the update; for a row-parallel one
  (``o_proj``, ``down_proj``) x and A are split on the input features and B is replicated,
  so each device's ``(x_d A_d) B`` is a partial sum, returned as one part per device
  (``row_parallel_parts``) for ``ShardingHints.project`` to add to the base projection's
  partial sums before their single all-reduce. No collective is added for LoRA. Tokens
  are grouped by slot once per step per data shard.

KV arrays are laid out by the layout's own rules over the ``KVCache`` pytree, so the
wrapper follows whatever KV layout ``coserve_jax.kv_cache`` and ``sharding.layout`` use;
it only assumes KV heads sit on the second-to-last axis, each head's entries adjacent.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coserve_jax.kv_cache import KVCache
from pallas_kernels.dispatch import KernelOptions, Kernels
from pallas_kernels.ragged_paged_attention import flash
from sharding.layout import ROW_PARALLEL, Layout
from sharding.mesh import MODEL

log = logging.getLogger(__name__)


def _is_spec(x) -> bool:
    return isinstance(x, P)


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedKernels:
    """``kernels`` (a Pallas path: "kernel" or "interpret") under ``shard_map`` on the mesh
    of ``layout``; a drop-in for ``Kernels`` in ``step_fn`` and ``backward_piece_fn``."""

    kernels: Kernels
    layout: Layout
    heads: _Heads = dataclasses.field(init=False)

    def __post_init__(self):
        if not self.kernels.uses_pallas:
            raise ValueError(f"ShardedKernels wraps the Pallas kernels, got {self.kernels.impl!r}")
        heads = _Heads.of(self.layout)
        object.__setattr__(self, "heads", heads)
        if heads.copies_kv:
            log.info("%d KV heads on a %d-way model axis: KV pages are replicated and each "
                     "device's paged attention kernel reads its KV heads from a per-layer "
                     "copy of them", self.layout.cfg.num_kv_heads, self.layout.model_size)

    @property
    def impl(self) -> str:
        return self.kernels.impl

    @property
    def options(self) -> KernelOptions:
        return self.kernels.options

    @property
    def uses_pallas(self) -> bool:
        return True

    # ----- layout helpers ------------------------------------------------------------------

    def _map(self, fn: Callable, in_specs, out_specs) -> Callable:
        # check_vma=False: the kernels' pallas_calls do not declare how their outputs vary
        # over mesh axes, which check_vma requires; every out spec here names exactly the
        # axes its values vary on. The transpose (the flash pair's, in the backward pieces)
        # then sums an input's cotangent over the mesh axes its spec leaves out.
        return jax.shard_map(fn, mesh=self.layout.mesh, in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)

    def _tokens(self, num_tokens: int) -> str | None:
        """The mesh axis of a token axis (``data`` when it splits it, as the batch's)."""
        layout = self.layout
        data = layout.data
        return data if data is not None and num_tokens % layout.data_size == 0 else None

    def _per_shard(self, fn: Callable, *token_args, replicated=()) -> object:
        """``fn(*token_args, *replicated)`` per data shard: the token arrays split as the
        batch's, the result's leaves stacked on their leading axis over ``data``."""
        tok = self._tokens(token_args[0].shape[0])
        out = jax.eval_shape(fn, *token_args, *replicated)
        in_specs = (*(P(tok) for _ in token_args), *(P() for _ in replicated))
        out_specs = jax.tree.map(lambda _: P(tok), out)
        return self._map(fn, in_specs, out_specs)(*token_args, *replicated)

    # ----- ragged paged attention (the step) -----------------------------------------------

    def plan_paged_attention(self, seq_ids: jax.Array, positions: jax.Array,
                             page_tables: jax.Array, *, num_q_per_kv: int,
                             page_size: int) -> Callable:
        """``Kernels.plan_paged_attention`` per device: the block layout of each data shard's
        tokens, computed once here, and the kernel on each device's heads."""
        heads = self.heads

        def metadata_of(seq_ids, positions, page_tables):
            return self.kernels.attention_metadata(
                seq_ids, positions, page_tables, num_q_per_kv=heads.local_group,
                page_size=page_size)

        metadata = self._per_shard(metadata_of, seq_ids, positions, replicated=(page_tables,))
        return functools.partial(self._paged_attention, metadata=metadata)

    def _paged_attention(self, q: jax.Array, *args: jax.Array, layer=None,
                         metadata=None) -> jax.Array:
        """``(q, *kv_pages, page_tables, seq_ids, positions, layer=)`` as the planned
        ``Kernels.paged_attention`` (the KV arrays are whatever ``KVCache`` holds)."""
        kv, (page_tables, seq_ids, positions) = args[:-3], args[-3:]
        kv_specs = self._kv_specs(kv)
        heads = self.heads
        tok = self._tokens(q.shape[0])
        q_spec = P(tok, heads.q_axis, None)
        meta_specs = jax.tree.map(lambda _: P(tok), metadata)
        has_layer = layer is not None

        def body(q, kv, page_tables, seq_ids, positions, metadata, *layer):
            layer = layer[0] if has_layer else None
            if heads.copies_kv:
                kv = jax.tree.map(
                    lambda pages: heads.kv_of_device(pages if layer is None else pages[layer]),
                    kv)
                layer = None
            return self.kernels.paged_attention(q, *kv, page_tables, seq_ids, positions,
                                                layer=layer, metadata=metadata)

        in_specs = (q_spec, kv_specs, P(), P(tok), P(tok), meta_specs,
                    *((P(),) if has_layer else ()))
        return self._map(body, in_specs, q_spec)(
            q, tuple(kv), page_tables, seq_ids, positions, metadata,
            *((layer,) if has_layer else ()))

    def _kv_specs(self, kv: tuple) -> tuple:
        """The layout's specs of the KV arguments (``KVCache`` objects, or the arrays a
        ``KVCache`` holds, in its field order), read off the ``KVCache`` pytree."""
        if all(isinstance(x, KVCache) for x in kv):
            specs = tuple(self.layout.specs(x) for x in kv)
        else:
            template = KVCache(**{f.name: 0 for f in dataclasses.fields(KVCache) if f.init})
            treedef = jax.tree.structure(template)
            if treedef.num_leaves != len(kv):
                raise ValueError(f"paged attention got {len(kv)} KV arrays; KVCache holds "
                                 f"{treedef.num_leaves}")
            specs = tuple(jax.tree.leaves(
                self.layout.specs(jax.tree.unflatten(treedef, list(kv))), is_leaf=_is_spec))
        for pages, spec in zip(jax.tree.leaves(kv), jax.tree.leaves(specs, is_leaf=_is_spec),
                               strict=True):
            axes = tuple(spec) + (None,) * (pages.ndim - len(spec))
            # Only the KV head axis may be split, and only on model: the kernel's pages
            # are otherwise whole on every device.
            if any(a is not None for i, a in enumerate(axes) if i != pages.ndim - 2) or \
                    axes[-2] not in (None, MODEL) or (axes[-2] == MODEL) != self.heads.kv_split:
                raise ValueError(f"paged attention under shard_map needs KV pages split on "
                                 f"KV heads only, got {spec} for {pages.shape}")
        return specs

    # ----- dense causal flash attention (the backward pieces) ------------------------------

    def attention_fn(self, fallback: Callable | None = None) -> Callable:
        """``Kernels.attention_fn`` with the flash pair per device (its head split);
        shapes the kernel cannot tile take ``fallback`` under GSPMD, as unsharded."""
        heads = self.heads

        def attention(layer, q, k, v, carry):
            if fallback is not None and not flash.flash_supports(q.shape[-1]):
                return fallback(layer, q, k, v, carry)
            q_spec = P(None, None, heads.q_axis, None)
            kv_spec = P(None, None, MODEL if heads.kv_split else None, None)

            def body(q, k, v):
                if heads.copies_kv:
                    k, v = heads.kv_of_device(k), heads.kv_of_device(v)
                return self.kernels.causal_attention(q, k, v)

            return self._map(body, (q_spec, kv_spec, kv_spec), q_spec)(q, k, v), carry

        return attention

    # ----- multi-slot LoRA (the step) -------------------------------------------------------

    def multi_slot_lora(self, scale: jax.Array, slot_ids: jax.Array) -> ShardedLora:
        """``Kernels.multi_slot_lora`` per device: tokens grouped by slot once per data
        shard, the grouped kernels on each device's part of the dependent layout."""
        groups = None if self.options.dense_lora else self._per_shard(
            lambda ids: self.kernels.group_tokens(ids, scale.shape[0], ids.shape[0]), slot_ids)
        return ShardedLora(self, scale, slot_ids, groups)

    @staticmethod
    def lora_single(x, a, b, scale) -> jax.Array:
        return Kernels.lora_single(x, a, b, scale)


@dataclasses.dataclass(frozen=True)
class ShardedLora:
    """The step's ``LoraFn`` on a mesh; ``ShardingHints.project`` calls
    ``row_parallel_parts`` for a split row-parallel projection."""

    owner: ShardedKernels
    scale: jax.Array
    slot_ids: jax.Array
    groups: object  # TokenGroups, each leaf stacked over data shards; None for dense LoRA

    def _run(self, x, a, b, x_spec, a_spec, b_spec, out_spec, parts: bool) -> jax.Array:
        kernels = self.owner.kernels
        tok = x_spec[0]
        groups = () if self.groups is None else (self.groups,)
        group_specs = tuple(jax.tree.map(lambda _: P(tok), g) for g in groups)

        def body(x, a, b, scale, slot_ids, *groups):
            if parts:  # [T, 1, in/m]: this device's part
                x = x[:, 0]

            def delta():
                return kernels.lora_grouped(x, a, b, scale, slot_ids,
                                            groups[0] if groups else None)

            # Skipped at run time when none of this shard's tokens names a slot.
            y = kernels.unless_unused(jnp.any(slot_ids >= 0), delta,
                                      (x.shape[0], b.shape[-1]), x.dtype)
            return y[:, None] if parts else y

        return self.owner._map(body, (x_spec, a_spec, b_spec, P(), P(tok), *group_specs),
                               out_spec)(x, a, b, self.scale, self.slot_ids, *groups)

    def _weights(self, la, module: str):
        a, b = la[module]
        layout = self.owner.layout
        return a, b, layout.spec_for(("a", module), a.shape), layout.spec_for(("b", module),
                                                                             b.shape)

    def __call__(self, la, module: str, x: jax.Array) -> jax.Array | None:
        """The update of a projection whose input is replicated on ``model``: x [T, in]."""
        if la is None or module not in la:
            return None
        a, b, a_spec, b_spec = self._weights(la, module)
        if a_spec[-2] is not None:
            raise ValueError(f"{module}: A is split on its input rows; its update is a "
                             "partial sum (row_parallel_parts)")
        tok = self.owner._tokens(x.shape[0])
        return self._run(x, a, b, P(tok, None), a_spec, b_spec, P(tok, b_spec[-1]), False)

    def row_parallel_parts(self, la, module: str, x_parts: jax.Array) -> jax.Array:
        """A split row-parallel projection's update as per-device partial sums:
        ``x_parts [T, m, in/m]`` (``model`` on ``m``) -> ``[T, m, out]``, part ``d`` being
        ``x_d A_d B``; summing over ``m`` (with the base projection's parts) gives it."""
        a, b, a_spec, b_spec = self._weights(la, module)
        if module not in ROW_PARALLEL or a_spec[-2] != MODEL or b_spec[-1] is not None:
            raise ValueError(f"{module}: not a split row-parallel LoRA ({a_spec}, {b_spec})")
        if x_parts.ndim != 3:
            raise ValueError(f"expected x parts [T, m, in/m], got {x_parts.shape}")
        tok = self.owner._tokens(x_parts.shape[0])
        spec = P(tok, MODEL, None)
        return self._run(x_parts, a, b, spec, a_spec, b_spec, spec, True)


@dataclasses.dataclass(frozen=True)
class _Heads:
    """How a layout splits attention heads over ``model``, and what each device computes."""

    num_q: int  # query heads per device
    num_kv: int  # KV heads of the model
    group: int  # query heads per KV head (the model's)
    q_axis: str | None  # mesh axis of the query-head axis
    kv_split: bool  # KV heads split on model too
    copies_kv: bool  # query heads split, KV replicated: a device reads a subset of KV heads
    per_query: bool  # with copies_kv: the device's query heads span several KV heads

    @classmethod
    def of(cls, layout: Layout) -> _Heads:
        cfg, m = layout.cfg, layout.model_size
        split = layout.decisions.heads and m > 1
        kv_split = split and layout.decisions.kv_heads
        num_q = cfg.num_heads // m if split else cfg.num_heads
        group = cfg.num_heads // cfg.num_kv_heads
        copies = split and not kv_split
        return cls(num_q=num_q, num_kv=cfg.num_kv_heads, group=group,
                   q_axis=MODEL if split else None, kv_split=kv_split, copies_kv=copies,
                   per_query=copies and group % num_q != 0)

    @property
    def local_group(self) -> int:
        """Query heads per KV head in each device's problem."""
        if not self.copies_kv:
            return self.group
        return 1 if self.per_query else self.num_q

    def kv_of_device(self, x: jax.Array) -> jax.Array:
        """The KV heads (second-to-last axis, a head's entries adjacent) this device's query
        heads read, from replicated ``x``: one head, or one per query head when they span
        several (then the device's problem has a group of 1)."""
        axis = x.ndim - 2
        entries = x.shape[axis] // self.num_kv  # 1, or 2 when K and V share the axis
        first_q = jax.lax.axis_index(MODEL) * self.num_q
        if not self.per_query:
            return jax.lax.dynamic_slice_in_dim(x, first_q // self.group * entries, entries,
                                                axis=axis)
        kv_head = (first_q + jnp.arange(self.num_q)) // self.group
        index = (kv_head[:, None] * entries + jnp.arange(entries)).reshape(-1)
        return jnp.take(x, index, axis=axis)
