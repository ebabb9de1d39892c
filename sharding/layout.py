"""Where every array of the co-serving step lives on a ``data x model`` mesh.

The base model's plan is fixed first (Megatron-style tensor parallelism on the
``model`` axis, weights replicated across ``data``):

- q/k/v/gate/up are column-parallel: their ``[in, out]`` weights are split on
  ``out``, so each device computes its own heads / MLP columns from the
  replicated residual stream with no communication.
- o/down are row-parallel: split on ``in``; each device multiplies its heads /
  MLP columns and the partial sums meet in one all-reduce per projection.
- Embedding and LM head are split on the vocabulary (the lookup is a masked
  local gather plus an all-reduce; logits come out split on the vocabulary).
- Norms and o_proj's bias are replicated; q/k/v biases follow their columns.
- KV pages ``[L, P, page, 2 * Hkv, Dh]`` (K and V interleaved per head) are split on
  the combined head axis, which keeps each head's K/V pair on one device (each device
  keeps the K/V of its own heads); with fewer KV heads than the model axis, K/V weights and
  pages are replicated (GQA: every device needs the KV heads its query heads read).

Adapters follow the base plan (dependent parallelization, FlexLLM section 5):
for a column-parallel projection B is split with the output columns and A is
replicated, so ``(x @ A) @ B`` lands in the base output's layout; for a
row-parallel one A is split with the input rows and B is replicated, so each
device's ``(x_d @ A_d) @ B`` is a partial sum that joins the base projection's
own all-reduce (the ``ShardingHints.project`` hook makes that explicit). The
forward therefore has no collective for LoRA. Gradient accumulators and job
optimizer state take the same layout as the weights they belong to.

Data parallelism splits the token axis of the batch across ``data``. Backward
pieces split the training sequence's tokens across ``data`` too, and keep one
partial LoRA-gradient accumulator per data shard (a leading ``data`` axis on
``TrainBuffers.grad_a/grad_b``), so the gradients cross the data axis once, at
the optimizer step, rather than once per piece.

Rules are keyed by the pytree field names (``q_proj``, ``k``, ``grad_a``...),
so one function lays out params, KV, slots, buffers, job params and any optax
state built over them, and works on ``jax.ShapeDtypeStruct`` trees (planning)
as on arrays. A dimension that the mesh axis does not divide is replicated
(always correct under GSPMD, only less parallel); ``Layout.notes`` says which.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coserve_jax.config import ModelConfig
from sharding.mesh import DATA, MODEL

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
PROJECTIONS = COLUMN_PARALLEL + ROW_PARALLEL
_ATTENTION = ("q_proj", "o_proj")
_KV = ("k_proj", "v_proj")
_BIAS_OF = {"q_bias": "q_proj", "k_bias": "k_proj", "v_bias": "v_proj"}


@dataclasses.dataclass(frozen=True)
class Decisions:
    """Which groups of the model the ``model`` axis splits (False: replicated)."""

    heads: bool
    """Query heads (q columns, o rows, their LoRA halves)."""
    kv_heads: bool
    """KV heads (k/v columns, KV pages)."""
    mlp: bool
    """MLP columns (gate/up columns, down rows)."""
    vocab: bool
    """Embedding rows and LM head columns."""
    hidden: bool
    """Hidden columns of the activation store and the boundary gradient."""


def decide(cfg: ModelConfig, model: int) -> tuple[Decisions, list[str]]:
    """What a ``model``-way split can shard for this model, and notes on what it cannot."""
    notes = []
    heads = model > 1 and cfg.num_heads % model == 0
    if model > 1 and not heads:
        notes.append(f"{cfg.num_heads} query heads do not split {model} ways: attention "
                     "weights and KV pages are replicated")
    kv = heads and cfg.num_kv_heads % model == 0
    if heads and not kv:
        notes.append(f"{cfg.num_kv_heads} KV heads do not split {model} ways: k/v weights "
                     "and KV pages are replicated on the model axis")
    mlp = model > 1 and cfg.intermediate_size % model == 0
    if model > 1 and not mlp:
        notes.append(f"intermediate size {cfg.intermediate_size} does not split {model} ways: "
                     "MLP weights are replicated")
    vocab = model > 1 and cfg.vocab_size % model == 0
    if model > 1 and not vocab:
        notes.append(f"vocabulary {cfg.vocab_size} does not split {model} ways: embedding "
                     "and LM head are replicated")
    hidden = model > 1 and cfg.hidden_size % model == 0
    return Decisions(heads=heads, kv_heads=kv, mlp=mlp, vocab=vocab, hidden=hidden), notes


class Layout:
    """The partition specs of every array the step touches, on one mesh.

    ``specs(tree)`` gives a tree of ``PartitionSpec`` (None where the tree has
    None), ``shardings(tree)`` the ``NamedSharding`` tree, ``put(tree)`` places a
    host or device tree, and ``zeros(fn, ...)`` allocates a tree that ``fn``
    would build directly in its layout (nothing materialises on one device).
    """

    def __init__(self, mesh: Mesh, cfg: ModelConfig):
        sizes = dict(mesh.shape)
        unknown = set(sizes) - {DATA, MODEL}
        if unknown:
            raise ValueError(f"mesh axes must be {DATA!r} and/or {MODEL!r}, got {tuple(sizes)}")
        self.mesh = mesh
        self.cfg = cfg
        self.data_size = sizes.get(DATA, 1)
        self.model_size = sizes.get(MODEL, 1)
        self.decisions, self.notes = decide(cfg, self.model_size)
        self.hints = ShardingHints(self)

    @classmethod
    def single(cls, cfg: ModelConfig, device=None) -> Layout:
        """The layout of an unsharded engine: a 1 x 1 mesh of one device (default the first),
        so one code path serves one device and many."""
        device = jax.devices()[0] if device is None else device
        mesh = Mesh(np.array([device], dtype=object).reshape(1, 1), (DATA, MODEL),
                    axis_types=(AxisType.Auto,) * 2)
        return cls(mesh, cfg)

    @property
    def sharded(self) -> bool:
        """The mesh has more than one device (its programs get sharding hints, and the
        Pallas kernels run under ``shard_map``)."""
        return self.mesh.size > 1

    # Equal layouts (same mesh and model) share the programs built for them.
    def __eq__(self, other) -> bool:
        return (isinstance(other, Layout) and self.mesh == other.mesh
                and self.cfg == other.cfg)

    def __hash__(self) -> int:
        return hash((self.mesh, self.cfg))

    # ----- axis helpers ---------------------------------------------------------------------

    @property
    def data(self) -> str | None:
        """The data axis name, or None when it has size 1 (specs stay minimal)."""
        return DATA if self.data_size > 1 else None

    def _model(self, split: bool) -> str | None:
        return MODEL if split and self.model_size > 1 else None

    def _module_split(self, module: str) -> bool:
        d = self.decisions
        if module in _ATTENTION:
            return d.heads
        if module in _KV:
            return d.kv_heads
        return d.mlp

    def weight_spec(self, module: str) -> tuple:
        """Trailing ``[in, out]`` spec of a base projection."""
        m = self._model(self._module_split(module))
        return (m, None) if module in ROW_PARALLEL else (None, m)

    def lora_spec(self, module: str, half: str) -> tuple:
        """Trailing spec of LoRA ``A [in, R]`` (half ``a``) or ``B [R, out]`` (``b``):
        split on the side the base projection is split on, replicated on the other."""
        m = self._model(self._module_split(module))
        if half == "a":
            return (m, None) if module in ROW_PARALLEL else (None, None)
        return (None, m) if module in COLUMN_PARALLEL else (None, None)

    # ----- rules ----------------------------------------------------------------------------

    def spec_for(self, names: tuple[str, ...], shape: tuple[int, ...]) -> P:
        """The spec of one leaf from its path names and shape."""
        d = self.decisions
        ndim = len(shape)
        module = next((n for n in names if n in PROJECTIONS), None)
        half = next((n for n in names if n in ("a", "b", "grad_a", "grad_b")), None)
        leaf = names[-1] if names else ""
        if "saved" in names and module is not None and ndim == 3:
            # [L, rows, out]: a projection's saved outputs (TrainBuffers.saved), split as
            # the projection's output is (column-parallel) or as the residual stream.
            out = (self._model(d.hidden) if module in ROW_PARALLEL
                   else self.weight_spec(module)[1])
            spec = (None, None, out)
        elif module is not None and half is not None and ndim >= 2:
            trailing = self.lora_spec(module, half[-1])
            lead: list[str | None] = [None] * (ndim - 2)
            # [G, L, N, ...]: per-data-shard partial gradient accumulators.
            if half.startswith("grad_") and ndim == 5:
                lead[0] = self.data
            spec = (*lead, *trailing)
        elif leaf in PROJECTIONS and ndim >= 2:
            spec = (*([None] * (ndim - 2)), *self.weight_spec(leaf))
        elif leaf in _BIAS_OF:
            spec = (*([None] * (ndim - 1)), self.weight_spec(_BIAS_OF[leaf])[1])
        elif leaf == "pages" and ndim == 5:  # KV pages [L, P, page, 2 * Hkv, Dh]
            # Contiguous shards of the interleaved axis hold whole (K, V) head pairs.
            spec = (None, None, None, self._model(d.kv_heads), None)
        elif leaf == "embed" and ndim == 2:  # [V, D]
            spec = (self._model(d.vocab), None)
        elif leaf == "lm_head" and ndim == 2:  # [D, V]
            spec = (None, self._model(d.vocab))
        elif leaf in ("acts", "grads_h"):  # [L, rows, D], [rows, D]
            spec = (*([None] * (ndim - 1)), self._model(d.hidden))
        else:  # norms, slot scales, optimizer counters, scalars
            spec = (None,) * ndim
        return P(*self._divisible(spec, shape))

    def _divisible(self, spec: tuple, shape: tuple[int, ...]) -> tuple:
        """Drops any axis that does not divide its dimension (that dimension is replicated)."""
        sizes = {DATA: self.data_size, MODEL: self.model_size}
        return tuple(a if a is None or n % sizes[a] == 0 else None
                     for a, n in zip(spec, shape, strict=True))

    def specs(self, tree: Any) -> Any:
        """A tree of ``PartitionSpec`` shaped like ``tree`` (arrays or ShapeDtypeStructs)."""
        def one(path, leaf):
            names = tuple(_key_name(k) for k in path)
            return self.spec_for(names, tuple(leaf.shape))

        return jax.tree_util.tree_map_with_path(one, tree)

    def batch_specs(self, batch: Any, token_fields: Collection[str]) -> Any:
        """Token batch specs: the per-token fields (``token_fields``, named by the core:
        ``coserve_jax.batch.TOKEN_FIELDS``) split on ``data``, the per-sequence ones
        replicated (they are tiny and every shard indexes them)."""
        def one(path, leaf):
            name = _key_name(path[-1])
            spec = (self.data,) if name in token_fields else (None,) * len(leaf.shape)
            return P(*self._divisible(spec, tuple(leaf.shape)))

        return jax.tree_util.tree_map_with_path(one, batch)

    def replicated_specs(self, tree: Any) -> Any:
        """Every leaf on every device, spelled with one ``None`` per dimension as ``specs``
        spells a replicated leaf (jit's dispatch cache tells ``P()`` from ``P(None)``)."""
        def one(leaf):
            shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
            return P(*(None,) * len(shape))

        return jax.tree.map(one, tree)

    def named(self, specs: Any) -> Any:
        """``NamedSharding`` tree of a spec tree."""
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, P))

    def shardings(self, tree: Any) -> Any:
        return self.named(self.specs(tree))

    # ----- placement ------------------------------------------------------------------------

    def put(self, tree: Any, shardings: Any | None = None) -> Any:
        """Places a tree (numpy or jax leaves) in its layout.

        Host leaves are cut with ``make_array_from_callback``, so each device (and
        each process of a multi-host run) only copies its own shard; every process
        must pass the same values.
        """
        shardings = self.shardings(tree) if shardings is None else shardings
        return jax.tree.map(_place, tree, shardings)

    def place_leaf(self, names: tuple[str, ...], leaf) -> jax.Array:
        """One leaf placed by its field path (``("layers", "q_proj")``); the loader's hook."""
        spec = self.spec_for(tuple(names), tuple(np.shape(leaf)))
        return _place(leaf, NamedSharding(self.mesh, spec))

    def place_model(self, model):
        """A ``coserve_jax.Model`` whose weights are in this layout (the same model if they
        already are)."""
        params = self.put(model.params)
        if all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params),
                                      strict=True)):
            return model
        return dataclasses.replace(model, params=params)

    def zeros(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """What ``fn(*args, **kwargs)`` builds, computed directly in its layout (``fn``
        must build from shapes only, e.g. ``KVCache.zeros``)."""
        build = functools.partial(fn, *args, **kwargs)
        return jax.jit(build, out_shardings=self.shardings(jax.eval_shape(build)))()

    def check_divides_tokens(self, sizes, what: str) -> None:
        """Token buckets split across ``data`` must be multiples of it."""
        bad = [n for n in sizes if n % self.data_size]
        if bad:
            raise ValueError(f"{what} {bad} must be multiples of the data axis "
                             f"({self.data_size}) to split tokens across it")

    # ----- jitted programs ------------------------------------------------------------------

    def jit_step(self, fn: Callable, out_specs: Any, token_fields: Collection[str],
                 compiler_options: dict | None = None) -> LayoutJit:
        """``fn(params, slots, kv, train, feed, batch, with_train=...) -> (kv, train, feed,
        out)`` jitted with every input and output in its layout and kv/train/feed donated
        (``feed``, the previous step's sampled tokens, is replicated).

        The core says what it hands over: ``out_specs`` is ``out``'s structure with a
        ``PartitionSpec`` at each leaf (``StepOutput.specs``), ``token_fields`` the batch
        fields with one entry per token (``batch_specs``). ``compiler_options`` go to
        ``jax.jit`` (XLA options; None: the defaults), here and in ``jit_train``."""
        out = self.named(out_specs)

        def shardings(params, slots, kv, train, feed, batch):
            ins = (self.shardings(params), self.shardings(slots), self.shardings(kv),
                   self.shardings(train), self.named(self.replicated_specs(feed)),
                   self.named(self.batch_specs(batch, token_fields)))
            return ins, (ins[2], ins[3], ins[4], out)

        return LayoutJit(self, fn, shardings, donate_argnums=(2, 3, 4),
                         static_argnames=("with_train",), batch_argnum=5,
                         compiler_options=compiler_options)

    def jit_backward(self, fn: Callable, compiler_options: dict | None = None) -> LayoutJit:
        """``fn(params, slots, train, piece, num_layers=, seq_len=) -> train`` in layout."""
        return self.jit_train(fn, ("num_layers", "seq_len"), compiler_options=compiler_options)

    def jit_train(self, fn: Callable, static_argnames: tuple[str, ...],
                  with_loss: bool = False, compiler_options: dict | None = None) -> LayoutJit:
        """``fn(params, slots, train, *inputs, **static) -> train`` (``(train, loss)`` with
        ``with_loss``), with ``train`` donated, the inputs replicated and ``train`` handed
        back in exactly the layout the step takes it in.

        Why exactly: jit's dispatch cache compares argument shardings by their spec, and
        ``P()`` (what a plain jit gives a replicated output) is not ``P(None, None, None)``
        (what the layout gives). A ``train`` in another spec sends the next step down
        jit's slow path, which re-traces the step when its trace has left jax's bounded
        caches: a compile in steady serving."""
        loss = NamedSharding(self.mesh, P())

        def shardings(params, slots, train, *inputs):
            ins = (self.shardings(params), self.shardings(slots), self.shardings(train),
                   *self.named(self.replicated_specs(inputs)))
            return ins, ((ins[2], loss) if with_loss else ins[2])

        return LayoutJit(self, fn, shardings, donate_argnums=(2,),
                         static_argnames=static_argnames, batch_argnum=3,
                         compiler_options=compiler_options)

    def jit_state(self, fn: Callable, donate_argnums: tuple[int, ...] = ()) -> StateJit:
        """Any function of state trees whose outputs are laid out by ``specs`` (job
        updates, slot writes, optimizer init): inputs keep their shardings, outputs are
        pinned to their layout so nothing drifts between programs."""
        return StateJit(self, fn, donate_argnums)


class StateJit:
    """``jax.jit(fn)`` with out_shardings from the layout of ``fn``'s output, one per
    argument structure and shapes (a dimension the mesh does not divide is replicated)."""

    def __init__(self, layout: Layout, fn: Callable, donate_argnums: tuple[int, ...]):
        self.layout = layout
        self.fn = fn
        self._donate = donate_argnums
        self._jits: dict = {}
        self._compiled: dict = {}  # what ``compile`` built ahead, by the same key

    @staticmethod
    def _key(args: tuple) -> tuple:
        return jax.tree.structure(args), tuple(np.shape(x) for x in jax.tree.leaves(args))

    def _jit(self, args: tuple):
        key = self._key(args)
        if key not in self._jits:
            out = jax.eval_shape(self.fn, *args)
            self._jits[key] = jax.jit(self.fn, out_shardings=self.layout.shardings(out),
                                      donate_argnums=self._donate)
        return self._jits[key]

    def compile(self, *args) -> None:
        """Compiles the program for these arguments now (nothing runs and nothing is
        donated), so that its first call does not compile."""
        key = self._key(args)
        if key not in self._compiled:
            self._compiled[key] = self._jit(args).lower(*args).compile()

    def __call__(self, *args):
        if self._compiled:
            compiled = self._compiled.get(self._key(args))
            if compiled is not None:
                return compiled(*args)
        return self._jit(args)(*args)

    def lower(self, *args):
        return self._jit(args).lower(*args)


class LayoutJit:
    """A jitted program whose in/out shardings come from the layout of its first call's
    argument structure (one ``jax.jit`` per structure; an engine has one)."""

    def __init__(self, layout: Layout, fn: Callable, shardings: Callable,
                 donate_argnums: tuple[int, ...], static_argnames: tuple[str, ...],
                 batch_argnum: int, compiler_options: dict | None = None):
        self.layout = layout
        self.compiler_options = compiler_options
        self.fn = fn
        self._shardings = shardings
        self._donate = donate_argnums
        self._static = static_argnames
        self._batch = batch_argnum
        self._jits: dict = {}

    def _jit(self, args: tuple):
        key = jax.tree.structure(args)
        if key not in self._jits:
            ins, outs = self._shardings(*args)
            n, names, fn = len(args), self._static, self.fn

            # jit takes no keyword arguments together with in_shardings: the static
            # keywords travel as trailing static positional arguments.
            def positional(*a):
                return fn(*a[:n], **dict(zip(names, a[n:], strict=True)))

            jitted = jax.jit(positional, in_shardings=ins, out_shardings=outs,
                             donate_argnums=self._donate,
                             static_argnums=tuple(range(n, n + len(names))),
                             compiler_options=self.compiler_options)
            self._jits[key] = (jitted, ins[self._batch])
        return self._jits[key]

    def _statics(self, static: dict) -> tuple:
        if set(static) != set(self._static):
            raise TypeError(f"expected keyword arguments {self._static}, got {tuple(static)}")
        return tuple(static[k] for k in self._static)

    def _args(self, args: tuple) -> tuple:
        jitted, batch_sharding = self._jit(args)
        if jax.process_count() == 1:  # jit places host batches itself (the fast path)
            return jitted, args
        # In a multi-process run jit refuses numpy inputs with non-replicated shardings:
        # host batches are placed here.
        args = list(args)
        args[self._batch] = self.layout.put(args[self._batch], batch_sharding)
        return jitted, tuple(args)

    def __call__(self, *args, **static):
        jitted, args = self._args(args)
        return jitted(*args, *self._statics(static))

    def lower(self, *args, **static):
        """``jax.jit(...).lower`` of the program with these arguments."""
        jitted, args = self._args(args)
        return jitted.lower(*args, *self._statics(static))

    def trace(self, *args, **static):
        """``jax.jit(...).trace`` of the program with these arguments (its jaxpr)."""
        jitted, args = self._args(args)
        return jitted.trace(*args, *self._statics(static))


class ShardingHints:
    """In-model hints for a layout (the single-device path passes no hints).

    ``project`` takes over row-parallel projections so that the LoRA update is
    added to the base projection's partial sums before their one reduction.
    ``tokens`` pins a ``[T, ...]`` activation's token axis to ``data``.
    """

    def __init__(self, layout: Layout):
        self.layout = layout

    def project(self, name: str, x: jax.Array, w: jax.Array, bias: jax.Array | None,
                la: object, lora: Callable | None) -> jax.Array | None:
        """``x @ w (+ bias) + lora`` of a projection in the Megatron layout.

        Column-parallel projections read the residual stream replicated on ``model``
        (pinned, so that GSPMD never splits it on the hidden axis and turns ``x @ A``
        into a reduction); their base and LoRA outputs come out split on columns.
        For a row-parallel projection the contraction axis is reshaped into
        ``[model, in/model]`` with ``model`` on the mesh axis, so each device's base
        product and LoRA update (``x_d @ A_d @ B``) are per-part partial sums; they are
        added first and summed over the parts once, which is the projection's single
        all-reduce. GSPMD left to itself reduces ``x @ A`` on its own (an extra
        all-reduce per layer) before multiplying by the replicated B. A ``lora`` with a
        ``row_parallel_parts(la, name, x_parts) -> [..., m, out]`` method computes those
        per-part updates itself (the Pallas kernels under ``shard_map``).
        """
        layout = self.layout
        m = layout.model_size
        if m == 1:
            return None
        if name not in ROW_PARALLEL or not layout._module_split(name):
            x = self.replicated_hidden(x)
            y = x @ w
            y = y if bias is None else y + bias
            delta = None if lora is None else lora(la, name, x)
            return y if delta is None else y + delta.astype(y.dtype)
        lead, fan_in = x.shape[:-1], x.shape[-1]
        xs = x.reshape(*lead, m, fan_in // m)
        xs = self._constrain(xs, (*self._lead(lead), MODEL, None))
        ws = w.reshape(m, fan_in // m, w.shape[-1])
        parts = jnp.einsum("...mi,mio->...mo", xs, ws)
        if lora is not None and la is not None and name in la:
            row_parallel_parts = getattr(lora, "row_parallel_parts", None)
            if row_parallel_parts is not None:  # a LoraFn that places the parts itself
                delta = row_parallel_parts(la, name, xs)  # (the kernels, under shard_map)
            else:
                a, b = la[name]
                a_parts = a.reshape(*a.shape[:-2], m, fan_in // m, a.shape[-1])
                axis = a_parts.ndim - 3

                def part(x_part, a_part):
                    return lora({name: (a_part, b)}, name, x_part)

                delta = jax.vmap(part, in_axes=(xs.ndim - 2, axis), out_axes=xs.ndim - 2)(
                    xs, a_parts)
            parts = parts + delta.astype(parts.dtype)
        parts = self._constrain(parts, (*self._lead(lead), MODEL, None))
        # One all-reduce back to the replicated residual layout (not a reduce-scatter that
        # would leave the residual split on hidden).
        y = self.replicated_hidden(jnp.sum(parts, axis=-2))
        return y if bias is None else y + bias

    def tokens(self, x: jax.Array) -> jax.Array:
        """Splits the leading token axis of ``x [T, ...]`` across ``data`` (if it divides)."""
        if self.layout.data is None or x.shape[0] % self.layout.data_size:
            return x
        return self._constrain(x, (DATA, *([None] * (x.ndim - 1))))

    def replicated_hidden(self, x: jax.Array) -> jax.Array:
        """Pins the hidden (last) axis of an activation as replicated on ``model``.

        The residual stream is replicated in the Megatron plan; where it is written into
        a hidden-split buffer (the activation store), GSPMD would otherwise propagate that
        split back into the layer and pay an all-gather plus an all-reduce per LoRA."""
        return self._constrain(x, (*([P.UNCONSTRAINED] * (x.ndim - 1)), None))

    def groups(self, x: jax.Array, num_groups: int) -> jax.Array:
        """Pins the leading group axis of ``x [G, ...]`` (one per data shard) to ``data``."""
        if num_groups == 1:
            return x
        return self._constrain(x, (DATA, *([None] * (x.ndim - 1))))

    def _lead(self, lead: tuple[int, ...]) -> tuple:
        # Keep a token axis that is split on data split; other leading axes unconstrained.
        return (P.UNCONSTRAINED,) * len(lead)

    def _constrain(self, x: jax.Array, spec: tuple) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.layout.mesh, P(*spec)))


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _place(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array):
        if leaf.sharding == sharding:
            return leaf
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, layout: Layout) -> Any:
    """Base weights placed in their layout (a no-op for leaves already there)."""
    return layout.put(params)
