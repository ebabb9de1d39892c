"""Two ways to cut the finetuning backward into bounded pieces, measured side by side.

- **Layer pieces** (what the engine runs, ``coserve_jax.step.backward_piece_fn``):
  a few layers over the whole sequence, recomputed from each layer's saved input.
  State between pieces: the gradient at one layer boundary, ``[n, D]``.
- **Reverse token windows** (the other cut the design names): a window of tokens
  through all layers, last window first. Attention couples a window to every
  earlier position, so each piece also returns gradients for the earlier
  positions' K and V, accumulated until their own window comes. State between
  pieces: ``dK, dV [L, n, Hkv, Dh]`` in float32, and the sequence's KV pages must
  stay allocated until its backward ends.

This script implements the reverse-window cut here (it is not in the engine),
checks both against ``jax.grad`` of the whole-sequence loss on the embedded model,
times both on this machine, and compares their compiled memory for
Llama-3.1-8B shapes (XLA memory analysis with abstract shapes, no accelerator).

    python bench/backward_cuts.py [--no-record]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coserve_jax as cj
from coserve_jax.config import ModelConfig
from coserve_jax.finetune.buffers import TrainBuffers
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.lora.slots import AdapterSlots
from coserve_jax.model import single_adapter_lora
from coserve_jax.models import llama
from coserve_jax.step import BackwardPiece, backward_piece_fn

import finetune_memory as fm
from benchlib import record


def forward_saving(cfg: ModelConfig, params, own, scale, tokens):
    """Whole-sequence forward: each layer's input, K and V, and dLoss/d(last output)."""
    lora = single_adapter_lora(scale)
    n = tokens.shape[0]
    cos, sin = llama.rope_cos_sin(cfg, jnp.arange(n))

    def body(h, xs):
        lp, la = xs

        def attention(_, q, k, v, carry):
            return llama.dense_causal_attention(q[None], k[None], v[None])[0], (k, v)

        out, kv = llama.decoder_layer(cfg, lp, la, 0, h, cos, sin, attention, None, lora)
        return out, (h, kv[0], kv[1])

    x, (acts, ks, vs) = jax.lax.scan(body, params.embed[tokens], (params.layers, own))
    return x, acts, ks, vs


def head_grad(cfg, params, x, labels, weights):
    def loss(x):
        logits = llama.lm_head(params, llama.final_norm(cfg, params, x))
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return jnp.sum(ce * weights)

    return jax.grad(loss)(x)


def reverse_window_piece(cfg: ModelConfig, params, own, scale, acts, ks, vs, g_top, dk, dv,
                         start, *, window: int):
    """Backward of tokens ``start .. start+window`` through all layers (top first).

    ``acts/ks/vs [L, n, ...]`` are the saved layer inputs and K/V; ``dk/dv`` the
    K/V gradients accumulated from later windows. Returns (LoRA grads of this
    window, updated dk, dv).
    """
    lora = single_adapter_lora(scale)
    pos = start + jnp.arange(window)
    cos, sin = llama.rope_cos_sin(cfg, pos)

    def layer(lp, la, h, k_all, v_all):
        def attention(_, q, k, v, carry):
            k_full = jax.lax.dynamic_update_slice_in_dim(k_all, k, start, 0)
            v_full = jax.lax.dynamic_update_slice_in_dim(v_all, v, start, 0)
            out = llama.dense_causal_attention(q[None], k_full[None], v_full[None],
                                               q_offset=start)[0]
            return out, (k, v)

        return llama.decoder_layer(cfg, lp, la, 0, h, cos, sin, attention, None, lora)

    def body(carry, xs):
        g, dk, dv = carry
        lp, la, i = xs
        h = jax.lax.dynamic_slice_in_dim(acts[i], start, window, 0)
        _, pull = jax.vjp(layer, lp, la, h, ks[i], vs[i])
        ct_k = jax.lax.dynamic_slice_in_dim(dk[i], start, window, 0)
        ct_v = jax.lax.dynamic_slice_in_dim(dv[i], start, window, 0)
        cts = (g.astype(h.dtype), (ct_k.astype(h.dtype), ct_v.astype(h.dtype)))
        _, d_la, dh, dk_all, dv_all = pull(cts)
        dk = dk.at[i].add(dk_all.astype(dk.dtype))
        dv = dv.at[i].add(dv_all.astype(dv.dtype))
        return (dh.astype(jnp.float32), dk, dv), d_la

    xs = (params.layers, own, jnp.arange(cfg.num_layers))
    (_, dk, dv), d_own = jax.lax.scan(body, (g_top, dk, dv), xs, reverse=True)
    return d_own, dk, dv


def reverse_window_grads(cfg, params, own, scale, tokens, labels, weights, window: int):
    x, acts, ks, vs = forward_saving(cfg, params, own, scale, tokens)
    g_all = head_grad(cfg, params, x, labels, weights)
    dk = jnp.zeros(ks.shape, jnp.float32)
    dv = jnp.zeros(vs.shape, jnp.float32)
    piece = jax.jit(functools.partial(reverse_window_piece, cfg, window=window))
    total = jax.tree.map(jnp.zeros_like, own)
    n = tokens.shape[0]
    for start in range(n - window, -1, -window):
        g = g_all[start:start + window]
        d_own, dk, dv = piece(params, own, scale, acts, ks, vs, g, dk, dv, start)
        total = jax.tree.map(jnp.add, total, d_own)
    return total


def layer_piece_grads(cfg, params, own, scale, tokens, labels, weights, k: int):
    """The engine's cut: layer pieces over the whole sequence (one adapter slot)."""
    n = tokens.shape[0]
    x, acts, _, _ = forward_saving(cfg, params, own, scale, tokens)
    rank = own["q_proj"][0].shape[-1]
    slots = AdapterSlots(a={m: own[m][0][:, None] for m in own},
                         b={m: own[m][1][:, None] for m in own},
                         scale=jnp.asarray([scale], jnp.float32))
    train = TrainBuffers(acts=acts, grads_h=head_grad(cfg, params, x, labels, weights),
                         grad_a={m: jnp.zeros_like(slots.a[m], jnp.float32) for m in own},
                         grad_b={m: jnp.zeros_like(slots.b[m], jnp.float32) for m in own})
    piece = jax.jit(functools.partial(backward_piece_fn, cfg, num_layers=k, seq_len=n,
                                      attention_block=256))
    for start in range(cfg.num_layers - k, -1, -k):
        train = piece(params, slots, train, BackwardPiece(
            act_row=np.int32(0), layer_start=np.int32(start), length=np.int32(n),
            adapter_slot=np.int32(0)))
    del rank
    return {m: (train.grad_a[m][:, 0], train.grad_b[m][:, 0]) for m in own}


def tiny_setup(n: int, seed: int = 0):
    model = cj.load_model(cj.tiny_model_dir(), progress=False)
    cfg, params = model.config, model.params
    rng = np.random.default_rng(seed)
    adapter = cj.LoraAdapter.zeros_b("x", cj.LoraConfig(r=8, target_modules=ALL_TARGETS), cfg,
                                     seed)
    own = {m: (jnp.asarray(adapter.a[m]),
               jnp.asarray(rng.normal(0, 0.05, adapter.b[m].shape), jnp.float32))
           for m in ALL_TARGETS}
    tokens = jnp.asarray(rng.integers(3, 259, n), jnp.int32)
    labels = jnp.concatenate([tokens[1:], jnp.zeros(1, jnp.int32)])
    weights = jnp.full(n, 1.0 / (n - 1), jnp.float32).at[-1].set(0)
    return cfg, params, own, jnp.float32(adapter.config.scale), tokens, labels, weights


def check_and_time(n: int, window: int, k: int, repeats: int) -> dict:
    cfg, params, own, scale, tokens, labels, weights = tiny_setup(n)
    lora = single_adapter_lora(scale)

    def loss(own):
        logits = llama.forward_dense(cfg, params, tokens[None], own, lora)[0]
        ce = jax.nn.logsumexp(logits, -1) - logits[jnp.arange(n), labels]
        return jnp.sum(ce * weights)

    want = jax.grad(loss)(own)
    cuts = {
        "reverse windows": lambda: reverse_window_grads(cfg, params, own, scale, tokens, labels,
                                                        weights, window),
        "layer pieces": lambda: layer_piece_grads(cfg, params, own, scale, tokens, labels,
                                                  weights, k),
    }
    errors, times = {}, {name: [] for name in cuts}
    for name, fn in cuts.items():
        got = jax.block_until_ready(fn())  # compiles
        errors[name] = max(
            float(jnp.max(jnp.abs(got[m][i] - want[m][i])) / jnp.max(jnp.abs(want[m][i])))
            for m in ALL_TARGETS for i in (0, 1))
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        for name, fn in cuts.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: (errors[name], float(np.median(times[name]))) for name in cuts}


def memory_8b(n: int, window: int, rank: int = 16) -> dict:
    """Compiled temp bytes of one piece of each cut, and the state each keeps."""
    cfg = ModelConfig.from_hf_dict(fm.LLAMA31_8B)
    dtype = jnp.float16  # 2-byte stand-in for bf16 on CPU (see finetune_memory.py)
    params = fm.abstract_params(cfg, dtype)
    own = fm.abstract_adapter(cfg, rank, dtype)
    shape_kv = (cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim)
    acts = fm.sds((cfg.num_layers, n, cfg.hidden_size), dtype)
    ks = vs = fm.sds(shape_kv, dtype)
    dk = dv = fm.sds(shape_kv, jnp.float32)
    g = fm.sds((window, cfg.hidden_size), jnp.float32)
    rev = fm.analyse(functools.partial(reverse_window_piece, cfg, window=window), params, own,
                     fm.sds((), jnp.float32), acts, ks, vs, g, dk, dv, fm.sds((), jnp.int32),
                     donate=(7, 8))
    layer = fm.backward_piece(cfg, n, rank, 1, dtype)
    kv_bytes = 2 * np.prod(shape_kv) * 2
    return {
        "reverse_temp": rev.temp, "reverse_state": 2 * np.prod(shape_kv) * 4 + kv_bytes,
        "layer_temp": layer.temp, "layer_state": n * cfg.hidden_size * 4,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="sequence length on the embedded model")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--layers", type=int, default=1, help="layers per layer piece")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    fm.choose_dtype("float16")  # sets the XLA flag before the backend starts
    res = check_and_time(args.n, args.window, args.layers, args.repeats)
    lines = ["| cut | max rel. error vs jax.grad | backward of one sequence (s) |",
             "|---|---|---|"]
    for name, (err, t) in res.items():
        lines.append(f"| {name} | {err:.1e} | {t:.3f} |")
    ratio = res["reverse windows"][1] / res["layer pieces"][1]
    lines.append(f"\nEmbedded model, n={args.n}, window {args.window}, {args.layers} layer(s) "
                 f"per layer piece: reverse windows take {ratio:.2f}x the layer pieces' time.\n")
    lines += [f"| seq len | reverse window (W={args.window}): piece temp / kept state (GB) | "
              "layer piece (1 layer): piece temp / kept state (GB) |",
              "|---|---|---|"]
    for n in args.lengths:
        m = memory_8b(n, args.window)
        lines.append(f"| {n} | {m['reverse_temp'] / 1e9:.2f} / {m['reverse_state'] / 1e9:.2f} | "
                     f"{m['layer_temp'] / 1e9:.2f} / {m['layer_state'] / 1e9:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("backward_cuts: layer pieces vs reverse token windows", {
            "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
            "memory": "Llama-3.1-8B shapes, LoRA r=16 on all targets, float16 stand-in for bf16",
        }, text + "\n\n'Kept state' is what must live between pieces: layer pieces keep one "
           "boundary gradient [n, D] f32; reverse windows keep dK/dV [L, n, Hkv, Dh] f32 and "
           "the sequence's K/V until its backward ends. Both keep the layer inputs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
