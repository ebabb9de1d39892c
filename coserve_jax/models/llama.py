"""The Llama family decoder (Llama 2/3/3.1/3.2 and Qwen2/2.5), as pure functions.

Qwen2 is the Llama architecture with q/k/v biases (and usually tied
embeddings), so both share this file; ``ModelConfig`` carries the differences.

Parameters are a pytree whose layer weights are stacked on a leading axis of
size ``num_layers``, so ``lax.scan`` compiles one layer body for all layers.
Linear weights are stored ``[in, out]`` (the transpose of torch's layout) so a
projection is ``x @ w``.

Two entry points share the layer body and differ only in attention:
``forward_dense`` (whole sequences, causal mask, no cache: the reference) and
``forward_paged`` (a ragged token batch reading and writing paged KV).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.config import ModelConfig, rope_inv_freq

# Names follow Hugging Face's module names so LoRA target modules map one to one.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@flax.struct.dataclass
class LayerParams:
    """Weights of all decoder layers, stacked: every leaf has leading axis L."""

    input_norm: jax.Array  # [L, D]
    q_proj: jax.Array  # [L, D, Hq*Dh]
    k_proj: jax.Array  # [L, D, Hkv*Dh]
    v_proj: jax.Array  # [L, D, Hkv*Dh]
    o_proj: jax.Array  # [L, Hq*Dh, D]
    post_norm: jax.Array  # [L, D]
    gate_proj: jax.Array  # [L, D, F]
    up_proj: jax.Array  # [L, D, F]
    down_proj: jax.Array  # [L, F, D]
    q_bias: jax.Array | None = None  # [L, Hq*Dh]
    k_bias: jax.Array | None = None  # [L, Hkv*Dh]
    v_bias: jax.Array | None = None  # [L, Hkv*Dh]
    o_bias: jax.Array | None = None  # [L, D]


@flax.struct.dataclass
class Params:
    """All frozen base weights of the model."""

    embed: jax.Array  # [V, D]
    layers: LayerParams
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to the embedding


# attention(layer_index, q [..., Hq, Dh], k [..., Hkv, Dh], v [..., Hkv, Dh], carry)
#   -> (out [..., Hq, Dh], carry)
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, object], tuple]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As Hugging Face: normalise in float32, cast back, then scale.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables ``[..., Dh]`` for integer positions ``[...]`` (float32)."""
    inv_freq = jnp.asarray(np.asarray(rope_inv_freq(cfg.rope, cfg.head_dim), np.float32))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [..., H, Dh]`` with Hugging Face's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x * cos + rotated * sin).astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    y = x @ w
    return y if b is None else y + b


# lora(layer_adapter, module_name, x) -> the LoRA update of that projection, or None.
LoraFn = Callable[[object, str, jax.Array], "jax.Array | None"]


class ProjectionHints(Protocol):
    """Sharding hints for the layer body (``sharding.layout.ShardingHints``); None on one
    device, where the layer is exactly the plain computation."""

    def project(self, name: str, x: jax.Array, w: jax.Array, bias: jax.Array | None,
                la: object, lora: LoraFn | None) -> jax.Array | None:
        """The whole projection ``x @ w + bias + lora`` in a layout-aware form, or None to
        use the plain one."""

    def replicated_hidden(self, x: jax.Array) -> jax.Array:
        """``x`` with its hidden axis pinned to the residual stream's layout."""


@jax.custom_vjp
def _pullback_only(x: jax.Array, w: jax.Array) -> jax.Array:
    """Zeros shaped like ``x @ w`` whose pullback is that of ``x @ w`` with respect to
    ``x``: the derivative of a frozen projection whose value is known, without its matmul
    (``w`` is frozen: it gets no cotangent)."""
    return jnp.zeros((*x.shape[:-1], w.shape[-1]), x.dtype)


def _pullback_only_fwd(x, w):
    return _pullback_only(x, w), w


def _pullback_only_bwd(w, g):
    return g @ w.T.astype(g.dtype), jnp.zeros_like(w)


_pullback_only.defvjp(_pullback_only_fwd, _pullback_only_bwd)


def _projector(lp: LayerParams, la: object, lora: LoraFn | None,
               hints: ProjectionHints | None = None, tape: dict | None = None,
               replay: dict | None = None):
    """``proj(name, h, bias=None)``: one projection of the layer, with its LoRA update.

    ``tape`` (a dict) receives every projection's output by name. ``replay`` holds those
    outputs from an earlier forward of the same tokens: a projection then takes its value
    from there and runs no matmul; only its derivative is computed, by ``x`` (through the
    frozen weight) and by the adapter's weights (the backward of graph pruning)."""

    def proj(name: str, h: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        if replay is not None:
            # Value: the saved output exactly (the two added terms are zeros); derivative:
            # the frozen matmul's pullback and the LoRA update's, recomputed (it is small).
            delta = None if lora is None else lora(la, name, h)
            y = replay[name].astype(h.dtype) + _pullback_only(h, getattr(lp, name))
            if delta is None:
                return y
            return y + (delta - jax.lax.stop_gradient(delta)).astype(y.dtype)
        y = None
        if hints is not None:
            y = hints.project(name, h, getattr(lp, name), bias, la, lora)
        if y is None:
            y = _linear(h, getattr(lp, name), bias)
            delta = None if lora is None else lora(la, name, h)
            y = y if delta is None else y + delta.astype(y.dtype)
        if tape is not None:
            tape[name] = y
        return y

    return proj


def decoder_layer(
    cfg: ModelConfig,
    lp: LayerParams,
    la: object,
    layer_index: jax.Array,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    attention: AttentionFn,
    carry: object,
    lora: LoraFn | None = None,
    hints: ProjectionHints | None = None,
    tape: dict | None = None,
    replay: dict | None = None,
) -> tuple[jax.Array, object]:
    """One decoder layer on hidden states ``x [..., D]``.

    ``lp`` holds this layer's weights and ``la`` its adapter weights (whatever
    ``lora`` understands; None for the base model). ``hints`` (sharded runs only)
    may take over a projection to fix where its reduction happens. ``tape`` and
    ``replay``: see ``_projector`` (the projections' outputs, recorded or reused).
    """
    proj = _projector(lp, la, lora, hints, tape, replay)
    lead = x.shape[:-1]
    h = rms_norm(x, lp.input_norm, cfg.rms_norm_eps)
    q = proj("q_proj", h, lp.q_bias).reshape(*lead, cfg.num_heads, cfg.head_dim)
    k, v = _key_values(cfg, lp, proj, h, cos, sin)
    q = apply_rope(q, cos, sin)
    attn, carry = attention(layer_index, q, k, v, carry)
    x = x + proj("o_proj", attn.reshape(*lead, cfg.q_size), lp.o_bias)
    h = rms_norm(x, lp.post_norm, cfg.rms_norm_eps)
    mlp = proj("down_proj", jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h))
    return x + mlp, carry


def _key_values(cfg: ModelConfig, lp: LayerParams, proj, h: jax.Array, cos: jax.Array,
                sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    lead = h.shape[:-1]
    k = proj("k_proj", h, lp.k_bias).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    v = proj("v_proj", h, lp.v_bias).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    return apply_rope(k, cos, sin), v


def key_values(cfg: ModelConfig, lp: LayerParams, la: object, x: jax.Array, cos: jax.Array,
               sin: jax.Array, lora: LoraFn | None = None) -> tuple[jax.Array, jax.Array]:
    """The K (rotary applied) and V ``[..., Hkv, Dh]`` a layer computes from its input
    ``x [..., D]``: exactly what ``decoder_layer`` hands its attention (single device)."""
    return _key_values(cfg, lp, _projector(lp, la, lora),
                       rms_norm(x, lp.input_norm, cfg.rms_norm_eps), cos, sin)


def run_layers(
    cfg: ModelConfig,
    layers: LayerParams,
    x: jax.Array,
    positions: jax.Array,
    attention: AttentionFn,
    carry: object = None,
    *,
    adapters: object = None,
    lora: LoraFn | None = None,
    first_layer: jax.Array | int = 0,
    on_layer_input: Callable[[jax.Array, jax.Array, object], object] | None = None,
    on_projections: Callable[[jax.Array, dict, object], object] | None = None,
    replay: dict | None = None,
    hints: ProjectionHints | None = None,
    unroll: bool = False,
) -> tuple[jax.Array, object]:
    """Scans stacked ``layers`` (and per-layer ``adapters``) over ``x``; returns the last
    layer's output, before the final norm. ``unroll``: a loop instead of the scan, so
    every layer reads its weights by a static slice (``KernelOptions.unroll_layers``).

    ``first_layer`` numbers the layers when ``layers`` is a slice of the model;
    ``on_layer_input(layer_index, x, carry) -> carry`` sees each layer's input and
    ``on_projections(layer_index, {name: output}, carry) -> carry`` its projections'
    outputs. ``replay`` ``{name: [num_layers, ..., out]}`` gives every layer's projection
    outputs from an earlier forward, which the layers then reuse (``_projector``).
    """
    cos, sin = rope_cos_sin(cfg, positions)
    num = jax.tree.leaves(layers)[0].shape[0]

    def body(state, xs):
        h, c = state
        lp, la, i, saved = xs
        if hints is not None:  # the scan carry keeps the residual stream's layout
            h = hints.replicated_hidden(h)
        if on_layer_input is not None:
            c = on_layer_input(i, h, c)
        tape = None if on_projections is None else {}
        h, c = decoder_layer(cfg, lp, la, i, h, cos, sin, attention, c, lora, hints,
                             tape, saved)
        if on_projections is not None:
            c = on_projections(i, tape, c)
        if hints is not None:
            h = hints.replicated_hidden(h)
        return (h, c), None

    indices = first_layer + jnp.arange(num, dtype=jnp.int32)
    if hints is not None:
        x = hints.replicated_hidden(x)
    xs = (layers, adapters, indices, replay)
    if unroll:
        # A Python loop, not ``scan(unroll=True)``: the same static slices, but at 8B on
        # an H200 the 32 layers alone compiled in 4.3 s this way against 43 s unrolled
        # by the scan (bench/layer_weights.py, 2026-12-04).
        state = (x, carry)
        for k in range(num):
            state, _ = body(state, jax.tree.map(lambda a, k=k: a[k], xs))
        x, carry = state
    else:
        (x, carry), _ = jax.lax.scan(body, (x, carry), xs)
    if hints is not None:
        x = hints.replicated_hidden(x)
    return x, carry


def final_norm(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Float32 logits of normed hidden states ``h [..., D]``."""
    w = params.embed.T if params.lm_head is None else params.lm_head
    return (h @ w).astype(jnp.float32)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           q_offset: jax.Array | int = 0) -> jax.Array:
    """Plain causal GQA attention: queries ``q [B, Lq, Hq, Dh]`` at positions
    ``q_offset + 0..Lq-1`` over keys/values ``[B, L, Hkv, Dh]`` at positions ``0..L-1``."""
    b, lq, hq, dh = q.shape
    length, hkv = k.shape[1], k.shape[2]
    qg = q.reshape(b, lq, hkv, hq // hkv, dh)
    scores = jnp.einsum("bqkgd,bckd->bkgqc", qg, k,
                        preferred_element_type=jnp.float32) / np.sqrt(dh)
    causal = jnp.arange(length)[None, :] <= (q_offset + jnp.arange(lq))[:, None]
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqc,bckd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, dh).astype(q.dtype)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             block: int) -> jax.Array:
    """``dense_causal_attention`` one block of queries at a time, each block rematerialised
    under differentiation, so the backward holds scores of one block, not ``[L, L]``."""
    b, length, hq, dh = q.shape
    if length <= block or length % block:
        return dense_causal_attention(q, k, v)
    blocks = q.reshape(b, length // block, block, hq, dh).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        qi, i = args
        return dense_causal_attention(qi, k, v, q_offset=i * block)

    out = jax.lax.map(one, (blocks, jnp.arange(length // block)))
    return out.swapaxes(0, 1).reshape(b, length, hq, dh)


def dense_attention(_, q, k, v, carry):
    """``AttentionFn`` over whole sequences ``[B, L, H, Dh]``."""
    return dense_causal_attention(q, k, v), carry


def blocked_attention(block: int) -> AttentionFn:
    """``AttentionFn`` over whole sequences, ``block`` queries at a time."""

    def attention(_, q, k, v, carry):
        return blocked_causal_attention(q, k, v, block), carry

    return attention


def forward_dense(
    cfg: ModelConfig, params: Params, tokens: jax.Array, adapters: object = None,
    lora: LoraFn | None = None,
) -> jax.Array:
    """Logits ``[B, L, V]`` (float32) of whole sequences ``tokens [B, L]``, no cache."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, _ = run_layers(cfg, params.layers, params.embed[tokens], positions, dense_attention,
                      adapters=adapters, lora=lora)
    return lm_head(params, final_norm(cfg, params, x))


def init_random_params(cfg: ModelConfig, seed: int, dtype=np.float32, std: float = 0.02,
                       head_std: float | None = None):
    """Random weights as numpy arrays in Hugging Face's naming (torch layout).

    Used to generate the embedded default model; returns ``{hf_name: array}``.
    ``head_std`` (default ``std``) scales the untied LM head.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=std):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    d, f = cfg.hidden_size, cfg.intermediate_size
    tensors = {"model.embed_tokens.weight": normal(cfg.vocab_size, d),
               "model.norm.weight": np.ones(d, dtype)}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(cfg.vocab_size, d, scale=head_std or std)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(d, dtype),
            p + "post_attention_layernorm.weight": np.ones(d, dtype),
            p + "self_attn.q_proj.weight": normal(cfg.q_size, d),
            p + "self_attn.k_proj.weight": normal(cfg.kv_size, d),
            p + "self_attn.v_proj.weight": normal(cfg.kv_size, d),
            p + "self_attn.o_proj.weight": normal(d, cfg.q_size),
            p + "mlp.gate_proj.weight": normal(f, d),
            p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
        }
    return tensors


def forward_paged(
    cfg: ModelConfig,
    params: Params,
    kv,  # KVCache
    batch,  # TokenBatch
    paged_attention: Callable,
    write_kv: Callable,
    *,
    adapters: object = None,
    lora: LoraFn | None = None,
    extra: object = None,
    on_layer_input: Callable[[jax.Array, jax.Array, object], object] | None = None,
    on_projections: Callable[[jax.Array, dict, object], object] | None = None,
    hints: ProjectionHints | None = None,
    unroll: bool = False,
) -> tuple[jax.Array, object, object]:
    """Runs a ragged token batch through paged KV: returns (last layer output ``[T, D]``
    before the final norm, kv, extra). ``unroll``: see ``run_layers``.

    Each layer first writes the batch's K/V into its pages, then every token
    attends over its own sequence's pages, so chunks of one sequence in the same
    batch see each other causally. ``extra`` is threaded through
    ``on_layer_input(layer, x, extra) -> extra`` and
    ``on_projections(layer, {name: output}, extra) -> extra`` (see ``run_layers``).

    ``paged_attention(q, kv_pages, page_tables, seq_ids, positions, *, layer)``
    gets the whole stacked cache ``[L, P, page_size, 2 * Hkv, Dh]`` and the layer index (a
    ``pallas_kernels.dispatch.PagedAttentionFn``), so a kernel can read the layer's
    pages in place instead of XLA copying them out for every layer.
    """

    def attention(layer, q, k, v, carry):
        cache, ext = carry
        pages = write_kv(cache.pages, k, v, batch.slots, layer)
        out = paged_attention(q, pages, batch.page_tables, batch.seq_ids, batch.positions,
                              layer=layer)
        return out, (cache.replace(pages=pages), ext)

    def on_extra(fn):  # a hook on ``extra``, the second half of the scan's carry
        if fn is None:
            return None
        return lambda layer, value, carry: (carry[0], fn(layer, value, carry[1]))

    x, (kv, extra) = run_layers(cfg, params.layers, params.embed[batch.token_ids],
                                batch.positions, attention, (kv, extra), adapters=adapters,
                                lora=lora, on_layer_input=on_extra(on_layer_input),
                                on_projections=on_extra(on_projections), hints=hints,
                                unroll=unroll)
    return x, kv, extra
