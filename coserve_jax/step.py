"""The co-serving step, the backward pieces and the whole-sample baseline, as pure functions.

They are pure functions of arrays; every Python-level choice (model config, whether
finetuning tokens are present, piece size) is a bound or static argument, and array
shapes come only from buckets. ``programs.py`` jits them (the one module that does,
with their donation and shardings) and the runner runs them.

One iteration runs the step (inference tokens and finetuning forward windows
in one ragged batch) and, when there is one, a backward piece right after it.
They are two programs rather than one so that their compile variants add up
instead of multiplying; XLA runs one program at a time either way.

Attention and LoRA come from a ``pallas_kernels.dispatch.Kernels`` bundle that is
resolved once, when the step is built (``step_kernels``), and is part of the
builders' cache key: the Pallas kernels or the jnp references, never a per-call
choice. Sharded programs run the Pallas kernels under ``shard_map``
(``coserve_jax.sharded_kernels``).
"""

from __future__ import annotations

import dataclasses
import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.batch import TokenBatch, loss_row_sizes
from coserve_jax.config import ModelConfig
from coserve_jax.finetune.buffers import TrainBuffers, drop_negative
from coserve_jax.kv_cache import KVCache
from coserve_jax.lora.slots import AdapterSlots
from coserve_jax.models import llama
from coserve_jax.sampling import sample_tokens, token_logprobs
from pallas_kernels.dispatch import KernelOptions, Kernels, requested_impl, select_kernels
from pallas_kernels.ragged_paged_attention import write_kv_pages

log = logging.getLogger(__name__)

STEP_PROGRAM_VERSION = 6
"""Bumped when the step's program changes what a bucket costs (saved latency models are
keyed on it). 2: many-sequence batches attend by token on the reference path. 3: the step
also returns the sampled tokens' logprobs and the top ``MAX_LOGPROBS`` (a top-k over the
vocabulary per sequence). 4: the KV cache is one array with K and V combined on the head
axis (one scatter per layer). 5: a training step's loss head runs over its rows with a
loss only (``_training_loss``), priced apart (``latency.loss_head_key``). 6: a sample
in parts splits its layers by cost (``segment_bounds``), not into equal segments."""

REFERENCE_KERNELS = Kernels(impl="reference")
"""The jnp references: what direct callers of the step functions use by default."""


def step_kernels(impl: str | None = None, layout=None,
                 options: KernelOptions | None = None) -> Kernels:
    """The attention and LoRA implementations a step is built with, resolved once.

    ``impl`` is ``KernelConfig.impl``: "auto" | "kernel" | "reference" | "interpret"
    (None and "auto" defer to ``$COSERVE_KERNELS``). Raises ``ValueError`` for an unknown
    name or a path this backend cannot run ("kernel" on CPU). With a ``layout`` (sharded)
    the Pallas kernels run under ``shard_map`` (``coserve_jax.sharded_kernels``); jax's
    TPU kernels are not wrapped yet, so a sharded TPU step runs the references.
    ``options``: tile sizes and the LoRA choices (``KernelOptions``; None: the defaults).
    """
    kernels = select_kernels(impl, options)
    if layout is None or not layout.sharded or kernels.impl != "tpu":
        return kernels
    log.info("kernels=%r: a sharded TPU step runs the jnp reference attention and LoRA (jax's "
             "TPU kernels are not placed under shard_map)", requested_impl(impl))
    return dataclasses.replace(REFERENCE_KERNELS, options=kernels.options)


@flax.struct.dataclass
class StepOutput:
    """What one step returns to the host."""

    next_tokens: jax.Array  # [S] int32: sampled token of each sequence's logits token
    seq_loss: jax.Array  # [S] float32: weighted loss of each sequence's finetuning tokens
    # Of the model's raw distribution at each logits token (sampling.token_logprobs):
    sampled_logprobs: jax.Array  # [S] float32: logprob of the sampled token
    top_logprobs: jax.Array  # [S, MAX_LOGPROBS] float32, most likely first
    top_token_ids: jax.Array  # [S, MAX_LOGPROBS] int32
    logits: jax.Array | None = None  # [S, V] float32, only when built with return_logits

    @classmethod
    def specs(cls, return_logits: bool) -> StepOutput:
        """Its layout on a mesh (``Layout.jit_step``): every field replicated."""
        rep = jax.sharding.PartitionSpec()
        return cls(next_tokens=rep, seq_loss=rep, sampled_logprobs=rep, top_logprobs=rep,
                   top_token_ids=rep, logits=rep if return_logits else None)


@flax.struct.dataclass
class BackwardPiece:
    """Which layers of which training sequence one backward piece covers (scalars)."""

    act_row: jax.Array  # int32: first activation-store row of the sequence
    layer_start: jax.Array  # int32: first layer of the piece
    length: jax.Array  # int32: real tokens of the sequence
    adapter_slot: jax.Array  # int32: the job's slot
    block_start: jax.Array = np.int32(0)  # int32: first row of a token-block piece


def step_fn(cfg: ModelConfig, params, slots: AdapterSlots | None, kv: KVCache,
            train: TrainBuffers | None, feed: jax.Array | None, batch: TokenBatch, *,
            with_train: bool, return_logits: bool, hints=None,
            kernels: Kernels = REFERENCE_KERNELS):
    """Forward the ragged batch, write KV, sample; for finetuning tokens also save layer
    inputs and the loss gradient at the last layer's output.

    ``feed`` ``[F]`` int32 holds the tokens the previous step sampled, by sequence row:
    a token whose ``batch.feed_rows`` entry is ``r >= 0`` reads its id from ``feed[r]``
    instead of ``batch.token_ids`` (a decode token planned before the host has seen the
    token it feeds: the host schedules the next iteration while this one runs). The
    step returns the new feed, its own sampled tokens; None runs without one.

    ``hints`` (``sharding.layout.ShardingHints``, sharded runs only) lay out the
    row-parallel projections; None is the plain single-device computation.
    ``kernels`` supplies the paged attention and the multi-slot LoRA."""
    if feed is not None:
        fed = feed[jnp.clip(batch.feed_rows, 0, feed.shape[0] - 1)]
        batch = batch.replace(token_ids=jnp.where(batch.feed_rows >= 0, fed, batch.token_ids))
    # Per-batch metadata (attention block layout, LoRA token grouping) is computed here
    # once and reused by every layer of the scan.
    attention = kernels.plan_paged_attention(
        batch.seq_ids, batch.positions, batch.page_tables,
        num_q_per_kv=cfg.num_heads // cfg.num_kv_heads, page_size=kv.page_size)
    adapters = lora = None
    if slots is not None:
        adapters = slots.per_layer()
        lora = kernels.multi_slot_lora(slots.scale, batch.adapter_slots)
    save = save_projections = None
    if with_train:
        rows = drop_negative(batch.act_index, train.num_rows)

        def save(layer, x, stores):  # stores: (acts, saved)
            if hints is not None:  # the store's layout must not leak into the residual's
                x = hints.replicated_hidden(x)
            acts, saved = stores
            return acts.at[layer, rows].set(x.astype(acts.dtype), mode="drop"), saved

        if train.saved is not None:
            def save_projections(layer, outputs, stores):
                acts, saved = stores
                return acts, {name: buf.at[layer, rows].set(outputs[name].astype(buf.dtype),
                                                             mode="drop")
                              for name, buf in saved.items()}

    x, kv, stores = llama.forward_paged(
        cfg, params, kv, batch, attention, write_kv_pages,
        adapters=adapters, lora=lora,
        extra=None if train is None else (train.acts, train.saved),
        on_layer_input=save, on_projections=save_projections, hints=hints,
        unroll=kernels.options.unroll_layers)
    num_seqs = batch.num_seqs
    if with_train:
        ce, g = _training_loss(cfg, params, x, batch.labels, batch.loss_weights)
        acts, saved = stores
        train = train.replace(acts=acts, saved=saved,
                              grads_h=train.grads_h.at[rows].set(g, mode="drop"))
        seq_loss = jax.ops.segment_sum(ce * batch.loss_weights, batch.seq_ids, num_seqs)
    else:
        seq_loss = jnp.zeros((num_seqs,), jnp.float32)
    h = llama.final_norm(cfg, params, x[batch.logits_indices])
    logits = llama.lm_head(params, h)
    next_tokens = sample_tokens(logits, batch.temperature, batch.top_k, batch.top_p,
                                batch.seeds, batch.sample_counts)
    sampled_logprobs, top_logprobs, top_token_ids = token_logprobs(logits, next_tokens)
    out = StepOutput(next_tokens=next_tokens, seq_loss=seq_loss,
                     sampled_logprobs=sampled_logprobs, top_logprobs=top_logprobs,
                     top_token_ids=top_token_ids, logits=logits if return_logits else None)
    if feed is not None:
        n = min(num_seqs, feed.shape[0])
        feed = feed.at[:n].set(next_tokens[:n])
    return kv, train, feed, out


def _head_loss(cfg, params, x, labels, weights):
    """Weighted cross-entropy of every token; differentiated w.r.t. the last layer output x."""
    logits = llama.lm_head(params, llama.final_norm(cfg, params, x))
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(ce * weights), ce


def _training_loss(cfg, params, x, labels, weights):
    """The per-token cross-entropy ``ce [T]`` and its gradient w.r.t. the last layer output
    ``g [T, D]`` (of the weighted sum), computed over the rows with a loss weight only.

    The vocabulary projection, forward and backward, is the costliest part of the head: a
    finetuning window of a few tokens beside many decodes would pay it for every row of
    the bucket. The rows with a loss are gathered first (in order) and the head runs for
    the smallest of ``batch.loss_row_sizes`` that holds them, a ``lax.switch`` on their
    count; other rows get ``ce = 0`` and ``g = 0``, which is what their zero weight gives
    them anyway."""
    num_tokens = x.shape[0]
    sizes = loss_row_sizes(num_tokens)
    has_loss = weights != 0
    order = jnp.argsort(~has_loss, stable=True)  # rows with a loss first, in batch order

    def head(size):
        def run(x):
            if size == 0:
                return jnp.zeros((num_tokens,), jnp.float32), jnp.zeros_like(x)
            rows = order[:size]
            (_, ce), g = jax.value_and_grad(_head_loss, argnums=2, has_aux=True)(
                cfg, params, x[rows], labels[rows], weights[rows])
            ce = jnp.where(has_loss[rows], ce, 0.0)  # the size's rows past those with a loss
            return (jnp.zeros((num_tokens,), ce.dtype).at[rows].set(ce),
                    jnp.zeros_like(x).at[rows].set(g))
        return run

    branch = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(has_loss))  # first size >= count
    return jax.lax.switch(branch, [head(size) for size in sizes], x)


def _one_slot_lora(kernels: Kernels, scale: jax.Array) -> llama.LoraFn:
    """The ``LoraFn`` of one job's adapter ``{module: (a, b)}`` applied to every token (the
    backward pieces and whole samples, which carry one sequence of one job)."""

    def lora(la, module, x):
        return kernels.lora_single(x, *la[module], scale) if module in la else None

    return lora


def backward_piece_fn(cfg: ModelConfig, params, slots: AdapterSlots, train: TrainBuffers,
                      piece: BackwardPiece, *, num_layers: int, seq_len: int,
                      attention_block: int = 256, hints=None,
                      kernels: Kernels = REFERENCE_KERNELS) -> TrainBuffers:
    """Backpropagates one sequence through ``num_layers`` layers from ``piece.layer_start``.

    Recomputes the layers' forward over the whole sequence (``seq_len`` rows, the
    sequence's bucket) from the saved input of the first layer (with ``train.saved``,
    every projection's output is taken from there instead of being computed again:
    only attention and the elementwise ops run twice), pulls back the
    stored boundary gradient, accumulates the slot's LoRA gradients and stores
    the gradient at the piece's input for the next piece. Attention is the flash
    pair on the kernel paths of ``kernels``; otherwise it runs ``attention_block``
    queries at a time, so the piece holds scores of one block against the sequence
    rather than the whole ``[L, L]`` square.

    With data parallelism (``train.grad_groups`` G > 1, sharded runs only) the
    sequence's tokens are cut into G contiguous groups, one per data shard, and
    each group's LoRA gradients go into its own partial accumulator: the pullback
    never sums across data shards, the optimizer step does, once.
    """
    start, slot = piece.layer_start, piece.adapter_slot
    layers, own = _slot_layers(params, slots, slot, start, num_layers)
    scale = slots.scale[slot]
    valid = (jnp.arange(seq_len) < piece.length)[:, None]
    d = cfg.hidden_size
    h0 = jax.lax.dynamic_slice(train.acts, (start, piece.act_row, 0), (1, seq_len, d))[0]
    g = jax.lax.dynamic_slice(train.grads_h, (piece.act_row, 0), (seq_len, d))
    # Rows past the sequence hold stale data: zero them (causality keeps real rows clean).
    h0, g = jnp.where(valid, h0, 0), jnp.where(valid, g, 0)
    groups = train.grad_groups
    if hints is not None:
        h0 = hints.tokens(h0)

    one_slot = _one_slot_lora(kernels, scale)

    def lora(la, module, x):
        if module not in la:
            return None
        if groups == 1:
            return one_slot(la, module, x)
        # x [1, n, in] in G token groups; a [G, in, R] and b [G, R, out] are per-group
        # copies of the same weights, so their cotangents are per-group partial sums.
        a, b = la[module]
        xg = x.reshape(groups, x.shape[-2] // groups, x.shape[-1])
        if hints is not None:
            xg = hints.groups(xg, groups)
        y = jnp.einsum("gtr,gro->gto", jnp.einsum("gti,gir->gtr", xg, a.astype(x.dtype)),
                       b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
        return y.reshape(*x.shape[:-1], b.shape[-1])

    if groups > 1:  # [num_layers, in, R] -> [num_layers, G, in, R]
        own = jax.tree.map(
            lambda w: jnp.broadcast_to(w[:, None], (w.shape[0], groups, *w.shape[1:])), own)

    attention = kernels.attention_fn(fallback=llama.blocked_attention(attention_block))

    replay = None
    if train.saved is not None:  # {name: [num_layers, 1, seq_len, out]}, stale rows zeroed
        replay = {name: jnp.where(valid, jax.lax.dynamic_slice(
            buf, (start, piece.act_row, 0), (num_layers, seq_len, buf.shape[-1])), 0)[:, None]
            for name, buf in train.saved.items()}

    def forward(own_weights, h):
        out, _ = llama.run_layers(cfg, layers, h[None], jnp.arange(seq_len)[None], attention,
                                  adapters=own_weights, lora=lora,
                                  first_layer=start, replay=replay, hints=hints)
        return out[0]

    _, pullback = jax.vjp(forward, own, h0)
    d_own, dh = pullback(g.astype(h0.dtype))

    def accumulate(acc, grad):  # acc [L, N, ...], grad [num_layers, ...]
        if groups == 1:
            return _add_layer_grads(acc, grad, start, slot)
        # acc [G, L, N, ...], grad [num_layers, G, ...]
        at = (0, start, slot) + (0,) * (acc.ndim - 3)
        size = (groups, num_layers, 1, *acc.shape[3:])
        grad = jnp.moveaxis(grad, 1, 0)[:, :, None]
        cur = jax.lax.dynamic_slice(acc, at, size)
        return jax.lax.dynamic_update_slice(acc, cur + grad.astype(acc.dtype), at)

    return train.replace(
        grads_h=jax.lax.dynamic_update_slice(train.grads_h, dh.astype(jnp.float32),
                                             (piece.act_row, 0)),
        grad_a={m: accumulate(train.grad_a[m], d_own[m][0]) for m in train.grad_a},
        grad_b={m: accumulate(train.grad_b[m], d_own[m][1]) for m in train.grad_b},
    )


def backward_block_fn(cfg: ModelConfig, params, slots: AdapterSlots, train: TrainBuffers,
                      piece: BackwardPiece, *, seq_len: int, block: int,
                      kernels: Kernels = REFERENCE_KERNELS) -> TrainBuffers:
    """Backpropagates one block of ``block`` tokens (rows ``piece.block_start ..``) of one
    sequence through one layer (``piece.layer_start``): a backward piece whose cost is
    bounded by the block, not the sequence, so it fits beside a decode step.

    The layer's blocks run last first. Attention couples a block's queries to the keys
    and values of every earlier row, so the piece recomputes K and V of the whole
    sequence from the layer's saved input (a small share of a layer's work) and pulls
    its gradient back through them too: what it finds for rows before the block (their
    K/V path) and for the block itself goes into ``train.grads_next``. After the block
    at row 0 every later query has been through, ``grads_next`` holds the whole
    gradient at the layer's input: it becomes ``grads_h`` (the next layer down's
    boundary) and is cleared. LoRA gradients of all paths go into the slot's
    accumulators. Single device: the sharded paths run whole-sequence pieces."""
    layer, slot, start = piece.layer_start, piece.adapter_slot, piece.block_start
    lp = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False),
                      params.layers)
    own = {m: (slots.a[m][layer, slot], slots.b[m][layer, slot]) for m in slots.a}
    lora = _one_slot_lora(kernels, slots.scale[slot])
    d = cfg.hidden_size
    rows = jnp.arange(seq_len)
    valid = (rows < piece.length)[:, None]
    h_all = jax.lax.dynamic_slice(train.acts, (layer, piece.act_row, 0), (1, seq_len, d))[0]
    h_all = jnp.where(valid, h_all, 0)  # rows past the sequence hold stale data
    x_blk = jax.lax.dynamic_slice_in_dim(h_all, start, block)
    valid_blk = ((start + jnp.arange(block)) < piece.length)[:, None]
    g = jax.lax.dynamic_slice(train.grads_h, (piece.act_row + start, 0), (block, d))
    g = jnp.where(valid_blk, g, 0)
    cos_all, sin_all = llama.rope_cos_sin(cfg, rows)
    cos_blk, sin_blk = llama.rope_cos_sin(cfg, start + jnp.arange(block))

    def forward(own_weights, x_blk, h_all):
        k_all, v_all = llama.key_values(cfg, lp, own_weights, h_all, cos_all, sin_all, lora)

        def attention(_, q, k, v, carry):  # the block's queries over every row's K/V
            out = llama.dense_causal_attention(q[None], k_all[None], v_all[None],
                                               q_offset=start)
            return out[0], carry

        out, _ = llama.decoder_layer(cfg, lp, own_weights, layer, x_blk, cos_blk, sin_blk,
                                     attention, None, lora)
        return out

    _, pullback = jax.vjp(forward, own, x_blk, h_all)
    d_own, d_blk, d_all = pullback(g.astype(h_all.dtype))
    below = jax.lax.dynamic_slice(train.grads_next, (piece.act_row, 0), (seq_len, d))
    # The layer's first block (the one holding the last row) starts a fresh sum, whatever
    # a sequence dropped mid-backward left in these rows.
    below = jnp.where(start + block >= piece.length, 0.0, below)
    below = below + jnp.where(valid, d_all, 0).astype(jnp.float32)
    mine = jax.lax.dynamic_slice_in_dim(below, start, block)
    below = jax.lax.dynamic_update_slice_in_dim(
        below, mine + jnp.where(valid_blk, d_blk, 0).astype(jnp.float32), start, axis=0)
    boundary = jax.lax.dynamic_slice(train.grads_h, (piece.act_row, 0), (seq_len, d))
    last = start == 0  # the layer's last block: its input gradient is complete
    boundary = jnp.where(last, below, boundary)
    below = jnp.where(last, 0.0, below)

    def accumulate(acc, grad):  # acc [L, N, ...], grad [...] of one layer
        return _add_layer_grads(acc, grad[None], layer, slot)

    return train.replace(
        grads_h=jax.lax.dynamic_update_slice(train.grads_h, boundary, (piece.act_row, 0)),
        grads_next=jax.lax.dynamic_update_slice(train.grads_next, below, (piece.act_row, 0)),
        grad_a={m: accumulate(train.grad_a[m], d_own[m][0]) for m in train.grad_a},
        grad_b={m: accumulate(train.grad_b[m], d_own[m][1]) for m in train.grad_b},
    )


def sample_grads_fn(cfg: ModelConfig, params, slots: AdapterSlots, train: TrainBuffers,
                    tokens: jax.Array, labels: jax.Array, weights: jax.Array,
                    adapter_slot: jax.Array, *, attention_block: int = 256,
                    kernels: Kernels = REFERENCE_KERNELS) -> tuple[TrainBuffers, jax.Array]:
    """One whole training sample as a standard trainer runs it: the forward over all its
    tokens and ``jax.grad`` back through every layer, in one program (FlexLLM's
    temporal-sharing baseline, ``temporal-seq``). No KV cache, no activation store.

    ``tokens``, ``labels``, ``weights``: ``[n]`` (the sample padded to a length bucket;
    padding has weight 0, and causality keeps real rows clean). Adds the gradients of
    the weighted loss w.r.t. the slot's (rank-padded) A and B into the slot's
    accumulators, as the windows and pieces of the token-level path do; returns the
    buffers and the loss."""
    own = {m: (jnp.take(slots.a[m], adapter_slot, axis=1),
               jnp.take(slots.b[m], adapter_slot, axis=1)) for m in slots.a}
    lora = _one_slot_lora(kernels, slots.scale[adapter_slot])
    attention = kernels.attention_fn(fallback=llama.blocked_attention(attention_block))

    def loss(own_weights):
        x, _ = llama.run_layers(cfg, params.layers, params.embed[tokens][None],
                                jnp.arange(tokens.shape[0])[None], attention,
                                adapters=own_weights, lora=lora)
        total, _ = _head_loss(cfg, params, x[0], labels, weights)
        return total

    value, grads = jax.value_and_grad(loss)(own)

    def accumulate(acc, grad):  # acc [L, N, ...], grad [L, ...]
        return acc.at[:, adapter_slot].add(grad.astype(acc.dtype))

    train = train.replace(grad_a={m: accumulate(train.grad_a[m], grads[m][0]) for m in grads},
                          grad_b={m: accumulate(train.grad_b[m], grads[m][1]) for m in grads})
    return train, value


def segment_bounds(num_layers: int, segments: int, head_layers: float = 0.0) -> list[int]:
    """The first layer of each of ``segments`` contiguous segments of the model's layers,
    then ``num_layers``: the split of a sample run in parts (``sample_forward_fn``).

    Sized so that the heaviest part is as light as it can be: a program's length is what
    an iteration running it must fit. A lower segment's parts each run one pass over its
    layers (its forward, later its backward: about one layer forward's FLOPs a layer each,
    the base weights being frozen); the top segment's one part runs both passes over its
    layers plus the LM head and the loss, forward and backward, which cost ``head_layers``
    layer forwards (``head_cost_layers``). So the top segment holds about half as many
    layers as the others, fewer where the head is heavy, none where the head alone weighs
    as much as a lower part (a small model with a large vocabulary: on the small tier,
    equal segments made the top part 3.5-4x the others). The lower segments differ in size
    by at most one."""
    if not 1 <= segments <= num_layers:
        raise ValueError(f"a sample splits into 1 to {num_layers} segments of layers; "
                         f"got {segments}")
    if segments == 1:
        return [0, num_layers]
    lower = segments - 1

    def heaviest(top: int) -> float:
        return max(2 * top + head_layers, -(-(num_layers - top) // lower))

    # (Of equals, the largest top segment: the nearest to equal segments.)
    top = min(range(num_layers - lower + 1), key=lambda t: (heaviest(t), -t))
    rest = num_layers - top
    return [round(i * rest / lower) for i in range(segments)] + [num_layers]


def head_cost_layers(cfg: ModelConfig) -> float:
    """The LM head's forward and backward over a token in layer forwards (FLOPs): its two
    ``hidden x vocab`` products (logits, and the gradient at its input) against one layer's
    projections (attention and SwiGLU MLP), for ``segment_bounds``."""
    d = cfg.hidden_size
    layer = d * (2 * cfg.q_size + 2 * cfg.kv_size) + 3 * d * cfg.intermediate_size
    return 2 * d * cfg.vocab_size / layer


def _slot_layers(params, slots: AdapterSlots, slot, start, num_layers: int):
    """``(layers, own)``: the frozen weights of layers ``start .. + num_layers`` and slot
    ``slot``'s adapter weights ``{module: (a, b)}`` of the same layers."""

    def layer_slice(w):
        return jax.lax.dynamic_slice_in_dim(w, start, num_layers, axis=0)

    own = {m: (layer_slice(jnp.take(slots.a[m], slot, axis=1)),
               layer_slice(jnp.take(slots.b[m], slot, axis=1))) for m in slots.a}
    return jax.tree.map(layer_slice, params.layers), own


def _add_layer_grads(acc: jax.Array, grad: jax.Array, start, slot) -> jax.Array:
    """``acc [L, N, ...] += grad [num_layers, ...]`` at layers ``start ..`` of slot ``slot``."""
    at = (start, slot) + (0,) * (acc.ndim - 2)
    cur = jax.lax.dynamic_slice(acc, at, (grad.shape[0], 1, *acc.shape[2:]))
    return jax.lax.dynamic_update_slice(acc, cur + grad[:, None].astype(acc.dtype), at)


def _sample_segment(cfg: ModelConfig, params, slots: AdapterSlots, adapter_slot: jax.Array,
                    first_layer: jax.Array, num_layers: int, seq_len: int,
                    attention_block: int, kernels: Kernels):
    """``(forward(own, h) -> h_out, own)``: layers ``first_layer .. + num_layers`` of the
    model over one sample of ``seq_len`` rows, as a function of the slot's adapter weights
    of those layers (``own``) and the segment's input."""
    layers, own = _slot_layers(params, slots, adapter_slot, first_layer, num_layers)
    lora = _one_slot_lora(kernels, slots.scale[adapter_slot])
    attention = kernels.attention_fn(fallback=llama.blocked_attention(attention_block))

    def forward(own_weights, h):
        out, _ = llama.run_layers(cfg, layers, h[None], jnp.arange(seq_len)[None], attention,
                                  adapters=own_weights, lora=lora, first_layer=first_layer)
        return out[0]

    return forward, own


def sample_forward_fn(cfg: ModelConfig, params, slots: AdapterSlots, h: jax.Array | None,
                      tokens: jax.Array, adapter_slot: jax.Array, first_layer: jax.Array, *,
                      num_layers: int, attention_block: int = 256,
                      kernels: Kernels = REFERENCE_KERNELS):
    """The first parts of a whole sample run in parts (``SamplePart``): the forward of one
    segment of layers, from the embedded ``tokens [n]`` (``h`` None: the first segment) or
    from the segment below's output ``h [n, D]``. Returns the segment's output and its
    ``jax.vjp`` pullback, whose residuals (every activation the segment's backward needs)
    stay on the device until ``sample_backward_fn`` spends them: nothing is recomputed,
    so the parts together cost what the whole sample costs."""
    forward, own = _sample_segment(cfg, params, slots, adapter_slot, first_layer, num_layers,
                                   tokens.shape[0], attention_block, kernels)
    if h is None:  # the embedding is frozen: no gradient at the first segment's input
        embedded = params.embed[tokens]
        return jax.vjp(lambda own_weights: forward(own_weights, embedded), own)
    return jax.vjp(forward, own, h)


def sample_top_fn(cfg: ModelConfig, params, slots: AdapterSlots, train: TrainBuffers,
                  h: jax.Array, labels: jax.Array, weights: jax.Array, adapter_slot: jax.Array,
                  first_layer: jax.Array, *, num_layers: int, attention_block: int = 256,
                  kernels: Kernels = REFERENCE_KERNELS):
    """The middle part of a whole sample run in parts: the top segment's forward from
    ``h [n, D]``, the loss, and the backward down to the segment's input. Adds the
    segment's LoRA gradients to the slot's accumulators; returns ``(train, (loss, dh))``,
    ``dh [n, D]`` the gradient at the segment's input."""
    forward, own = _sample_segment(cfg, params, slots, adapter_slot, first_layer, num_layers,
                                   h.shape[0], attention_block, kernels)

    def loss(own_weights, h):
        total, _ = _head_loss(cfg, params, forward(own_weights, h), labels, weights)
        return total

    value, (d_own, dh) = jax.value_and_grad(loss, argnums=(0, 1))(own, h)
    return _add_sample_grads(train, d_own, adapter_slot, first_layer), (value, dh)


def sample_backward_fn(cfg: ModelConfig, params, slots: AdapterSlots, train: TrainBuffers,
                       pullback, dh: jax.Array, adapter_slot: jax.Array,
                       first_layer: jax.Array):
    """The last parts of a whole sample run in parts: one segment's backward, through the
    ``pullback`` its forward part returned, from the gradient ``dh [n, D]`` at its output.
    Adds its LoRA gradients to the slot's accumulators; returns ``(train, dh_in)``, the
    gradient at the segment's input (None for the first segment)."""
    pulled = pullback(dh)
    d_own, dh_in = pulled if len(pulled) == 2 else (pulled[0], None)
    return _add_sample_grads(train, d_own, adapter_slot, first_layer), dh_in


def _add_sample_grads(train: TrainBuffers, d_own: dict, slot, first_layer) -> TrainBuffers:
    return train.replace(
        grad_a={m: _add_layer_grads(train.grad_a[m], d_own[m][0], first_layer, slot)
                for m in train.grad_a},
        grad_b={m: _add_layer_grads(train.grad_b[m], d_own[m][1], first_layer, slot)
                for m in train.grad_b})
