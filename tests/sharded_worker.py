"""Runs in a subprocess with 8 simulated CPU devices (``tests/test_sharding.py``).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py \
        parity MODEL_DIR MESH [MESH ...]
    ... python tests/sharded_worker.py hlo MODEL_DIR model=8 data=2,model=4

``parity`` runs one co-serving scenario (two adapters and the base model serving
greedy and sampled requests, a finetuning job whose windows share the steps,
then its optimizer step) on one device and on each mesh, and compares sampled
tokens, the logits of a mixed batch, the LoRA gradients the job accumulated and
the weights after its (SGD) optimizer step. ``hlo`` reads compiled HLO: the
collectives of the model-parallel step with and without LoRA work, and the
reductions of the backward piece and the optimizer update on a data-parallel
mesh. Each prints one JSON line; the test asserts on it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import coserve_jax as cj
from coserve_jax.batch import Bucket, SeqChunk, build_batch
from coserve_jax.finetune.data import Dataset, TrainSequence
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.programs import build_step, slot_grads
from coserve_jax.runner_commands import RunStep
from coserve_jax.step import BackwardPiece
from sharding import MeshConfig, make_mesh

from support import random_adapter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pallas_kernels"))

VOCAB = 384
ENGINE = dict(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=32,
              min_token_bucket=32, min_seq_bucket=4, min_page_bucket=16, max_model_len=64,
              max_lora_rank=8, max_adapters=3, max_train_seqs=1, max_train_len=32,
              train_window=16, backward_layers=1)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def hf_config(num_kv_heads: int) -> dict:
    """8 query heads so every mesh here splits them; vocab and MLP divisible by 8."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": num_kv_heads, "head_dim": 32,
            "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2}


def scenario(model_dir: str, mesh, kernels: str = "auto") -> dict:
    """One engine's run; returns what the parity check compares (host arrays)."""
    model = cj.load_model(model_dir, progress=False, mesh=mesh)
    engine = cj.Engine(model, cj.EngineConfig.flat(**ENGINE, kernels=kernels), mesh=mesh)
    cfg = model.config
    # The same step, built to return logits too (the engine reads only tokens and losses),
    # so the logits check below reuses the programs the scenario compiled.
    runner = engine.runner
    runner.step = build_step(cfg, return_logits=True, layout=engine.layout,
                             kernels=engine.kernels)
    for i, r in enumerate((8, 4)):
        engine.load_adapter(random_adapter(f"ad{i}", cfg, r, 10 + i))
    rng = np.random.default_rng(3)
    seq = TrainSequence(tuple(rng.integers(3, VOCAB, 30).tolist()),
                        tuple([False] * 5 + [True] * 25))
    job = cj.FinetuneJob("job", Dataset([seq, seq]),
                         lora=cj.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
                         optimizer=cj.OptimizerConfig(name="sgd", learning_rate=0.5),
                         sequences_per_step=2, max_steps=1)
    engine.submit_job(job)
    trainer = engine.trainer
    run = trainer.jobs["job"]
    start = random_adapter("job", cfg, 4, 20)
    start.a = {m: np.asarray(v) for m, v in trainer.adapter_of(run).a.items()}
    engine.registry.write(run.slot, start)  # a non-zero B, so every gradient is non-zero
    requests = [(rng.integers(3, VOCAB, 9).tolist(), None, 0.0),
                (rng.integers(3, VOCAB, 21).tolist(), "ad0", 0.0),
                (rng.integers(3, VOCAB, 14).tolist(), "ad1", 0.9)]
    ids = [engine.add_request(p, cj.SamplingParams(max_tokens=6, ignore_eos=True,
                                                   temperature=t, seed=5), adapter=a)
           for p, a, t in requests]
    outputs: dict[str, list[int]] = {}
    grads = partials = None
    while grads is None or len(outputs) < len(ids):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
        if grads is None and run.seqs_done:
            # Read as soon as the first sequence is done: the second (it starts in a later
            # iteration, max_train_seqs=1) may finish while requests still run, and its
            # optimizer step clears the accumulators.
            grads = {m: tuple(np.asarray(g) for g in ab)
                     for m, ab in slot_grads(runner.train, run.slot).items()}
            # With data parallelism each data shard keeps its own partial sum until the
            # optimizer step: the per-shard partials of one module must differ (they cover
            # other tokens).
            buf = runner.train
            if buf.grad_groups > 1:
                g = np.asarray(buf.grad_b["down_proj"])[:, :, run.slot]
                partials = {"groups": buf.grad_groups,
                            "spec": str(buf.grad_b["down_proj"].sharding.spec),
                            "differ": bool(np.abs(g[0] - g[1]).max() > 1e-3 * np.abs(g).max())}
    while run.state == "running":
        engine.step()
    trained = trainer.adapter_of(run)

    # Logits of a mixed batch (base model and both adapters).
    chunks = []
    for i, slot in enumerate((-1, 0, 1)):
        n = 5 + 4 * i
        table = engine.allocator.grow(("logits", i), n)
        chunks.append(SeqChunk(token_ids=rng.integers(3, VOCAB, n).tolist(), start_position=0,
                               page_table=table, adapter_slot=slot))
    batch = build_batch(chunks, Bucket(32, 4, 16), engine.config.cache.page_size)
    out = runner.execute(RunStep(batch, with_train=False))
    result = {"outputs": [outputs[i] for i in ids], "grads": grads,
              "trained_a": trained.a, "trained_b": trained.b,
              "logits": np.asarray(out.logits)[:3], "next": np.asarray(out.next_tokens)[:3],
              "partials": partials}
    if engine.layout is not None:
        result["misplaced"] = misplaced(engine, run)
    return result


def misplaced(engine, run) -> list[str]:
    """State whose sharding is not its layout's (nothing may be gathered by accident)."""
    layout = engine.layout
    bad = []
    runner = engine.runner
    job = runner.jobs[run.spec.name]
    trees = {"params": engine.model.params, "kv": runner.kv, "slots": runner.slots,
             "train": runner.train, "job": job.params, "opt": job.opt_state,
             "feed": runner.feed}
    for name, tree in trees.items():
        for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                      jax.tree.leaves(layout.shardings(tree)), strict=True):
            if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
                bad.append(f"{name}{jax.tree_util.keystr(path)}: {leaf.sharding}")
    return bad


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def parity(model_dir: str, meshes: list[str]) -> dict:
    ref = scenario(model_dir, None)
    report = {}
    for spec in meshes:
        got = scenario(model_dir, make_mesh(MeshConfig.parse(spec)))
        errs = {"logits": rel(got["logits"], ref["logits"])}
        for m, (ga, gb) in ref["grads"].items():
            errs[f"grad_a.{m}"] = rel(got["grads"][m][0], ga)
            errs[f"grad_b.{m}"] = rel(got["grads"][m][1], gb)
            errs[f"trained_a.{m}"] = rel(got["trained_a"][m], ref["trained_a"][m])
            errs[f"trained_b.{m}"] = rel(got["trained_b"][m], ref["trained_b"][m])
        report[spec] = {
            "outputs_equal": got["outputs"] == ref["outputs"],
            "next_equal": bool(np.array_equal(got["next"], ref["next"])),
            "max_rel_err": max(errs.values()), "worst": max(errs, key=errs.get),
            "grads_nonzero": all(np.abs(g).max() > 0 for ab in ref["grads"].values()
                                 for g in ab),
            "misplaced": got["misplaced"],
            "partials": got["partials"],
        }
    return report


def kernel_steps(model_dir: str, mesh, kernels: str, **fields) -> dict:
    """Two co-serving steps and the backward pieces of their finetuning sequence, driven
    directly (two compiled programs: the finetuning step bucket and one backward piece).

    Step 1 prefills a base, an ``ad0`` and an ``ad1`` prompt (greedy, greedy, sampled)
    around the first 16-token window of a 30-token training sequence; step 2 decodes one
    token of each and forwards the second window over the first one's cached KV. Then both
    one-layer backward pieces run. Returns logits, sampled tokens, losses, the job slot's
    LoRA gradients and whether the programs contain Pallas calls. ``fields``: more of the
    engine's config."""
    fallbacks = Messages(logging.getLogger("pallas_kernels.dispatch"))
    model = cj.load_model(model_dir, progress=False, mesh=mesh)
    engine = cj.Engine(model, cj.EngineConfig.flat(**ENGINE, kernels=kernels, **fields),
                       mesh=mesh)
    cfg, trainer = model.config, engine.trainer
    step = build_step(cfg, return_logits=True, layout=engine.layout, kernels=engine.kernels)
    for i, r in enumerate((8, 4)):
        engine.load_adapter(random_adapter(f"ad{i}", cfg, r, 10 + i))
    rng = np.random.default_rng(3)
    seq = TrainSequence(tuple(rng.integers(3, VOCAB, 30).tolist()),
                        tuple([False] * 5 + [True] * 25))
    # Two sequences per optimizer step: the gradients of the first stay accumulated.
    engine.submit_job(cj.FinetuneJob("job", Dataset([seq, seq]), lora=cj.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_TARGETS), sequences_per_step=2))
    run = trainer.jobs["job"]
    start = random_adapter("job", cfg, 4, 20)
    start.a = {m: np.asarray(v) for m, v in trainer.adapter_of(run).a.items()}
    engine.registry.write(run.slot, start)  # a non-zero B, so every gradient is non-zero
    prompts = [(rng.integers(3, VOCAB, n).tolist(), slot, t)
               for n, slot, t in ((5, -1, 0.0), (6, 0, 0.0), (5, 1, 0.9))]
    bucket = Bucket(32, 4, 16, train=True)
    result: dict = {"logits": [], "next": [], "loss": []}
    for i in range(2):
        [window] = trainer.forward_windows(16, 1)
        chunks = []
        for j, (tokens, slot, temperature) in enumerate(prompts):
            start_position = 0 if i == 0 else len(tokens) - 1
            chunks.append(SeqChunk(
                token_ids=tokens[start_position:], start_position=start_position,
                page_table=engine.allocator.grow(("prompt", j), len(tokens)),
                temperature=temperature, seed=5, sample_count=i, adapter_slot=slot))
        chunks.insert(1, window[1])  # the window's tokens straddle both data shards
        batch = build_batch(chunks, bucket, engine.config.cache.page_size)
        runner = engine.runner
        if i == 0:
            args = (model.params, runner.slots, runner.kv, runner.train, None, batch)
            jaxpr = str(step.trace(*args, with_train=True).jaxpr)
            if mesh is not None:  # the program the call below runs (a persistent-cache hit)
                hlo = step.lower(*args, with_train=True).compile().as_text()
                result["collectives"] = count_collectives(hlo)
        runner.kv, runner.train, _, out = step(model.params, runner.slots, runner.kv,
                                               runner.train, None, batch, with_train=True)
        trainer.attach_losses([window], out.seq_loss, 1)
        order = [0, 2, 3]  # the prompts' rows (the window is row 1)
        next_tokens = np.asarray(out.next_tokens)
        for j, row in enumerate(order):
            prompts[j][0].append(int(next_tokens[row]))
        result["logits"].append(np.asarray(out.logits)[order])
        result["next"].append(next_tokens[order].tolist())
        result["loss"].append(float(np.asarray(out.seq_loss)[1]))
    piece = BackwardPiece(act_row=np.int32(0), layer_start=np.int32(0), length=np.int32(30),
                          adapter_slot=np.int32(run.slot))
    backward_jaxpr = str(runner.backward_program().trace(
        model.params, runner.slots, runner.train, piece, num_layers=1, seq_len=32).jaxpr)
    while trainer.run_backward_piece():
        pass
    result["grads"] = {m: tuple(np.asarray(g) for g in ab)
                       for m, ab in slot_grads(runner.train, run.slot).items()}
    result["pallas"] = {"step": "pallas_call" in jaxpr, "backward": "pallas_call" in backward_jaxpr}
    result["misplaced"] = misplaced(engine, run) if engine.layout is not None else []
    result["fallbacks"] = fallbacks.close()
    return result


class Messages(logging.Handler):
    """Collects a logger's warnings (the kernel dispatch's fallbacks) until ``close``."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logger, []
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> list[str]:
        self.logger.removeHandler(self)
        super().close()
        return self.messages


def kernel_parity(model_dir: str, meshes: list[str], **fields) -> dict:
    """``kernel_steps`` with the Pallas kernels in interpret mode on each mesh (and
    ``fields`` in their engines' config) against the single-device references."""
    ref = kernel_steps(model_dir, None, "reference")
    report = {}
    for spec in meshes:
        got = kernel_steps(model_dir, make_mesh(MeshConfig.parse(spec)), "interpret",
                           **fields)
        errs = {f"logits.{i}": rel(g, r)
                for i, (g, r) in enumerate(zip(got["logits"], ref["logits"], strict=True))}
        errs["loss"] = rel(got["loss"], ref["loss"])
        for m, (ga, gb) in ref["grads"].items():
            errs[f"grad_a.{m}"] = rel(got["grads"][m][0], ga)
            errs[f"grad_b.{m}"] = rel(got["grads"][m][1], gb)
        report[spec] = {
            "next_equal": got["next"] == ref["next"],
            "max_rel_err": max(errs.values()), "worst": max(errs, key=errs.get),
            "grads_nonzero": all(np.abs(g).max() > 0 for ab in ref["grads"].values()
                                 for g in ab),
            "finite": bool(all(np.isfinite(x).all() for x in got["logits"])),
            "pallas": got["pallas"], "reference_pallas": ref["pallas"],
            "fallbacks": got["fallbacks"], "collectives": got["collectives"],
            "misplaced": got["misplaced"],
        }
    return report


def attention_parity(cases: list[str]) -> dict:
    """The paged attention and flash kernels (interpret mode) under ``ShardedKernels`` on
    small head layouts, against the single-device references. A case is
    ``HQ,HKV,MESH``; 12 query and 3 KV heads on model=4 give each device query heads of
    two KV heads (the per-query-head KV copy), 8 and 2 one KV head per device."""
    report = {}
    for case in cases:
        hq, hkv, spec = case.split(",", 2)
        report[case] = attention_case(int(hq), int(hkv), make_mesh(MeshConfig.parse(spec)))
    return report


def attention_case(hq: int, hkv: int, mesh, head_dim: int = 16, page_size: int = 4) -> dict:
    from kernel_cases import paged_batch, rel_err

    from coserve_jax.config import ModelConfig
    from coserve_jax.kv_cache import KVCache
    from coserve_jax.sharded_kernels import ShardedKernels
    from pallas_kernels.dispatch import select_kernels
    from pallas_kernels.ragged_paged_attention.reference import (
        dense_causal_attention_reference,
        ragged_paged_attention_reference,
    )
    from sharding import Layout

    cfg = ModelConfig.from_hf_dict(hf_config(hkv) | {
        "num_attention_heads": hq, "head_dim": head_dim, "hidden_size": hq * head_dim})
    layout = Layout(mesh, cfg)
    kernels = ShardedKernels(select_kernels("interpret"), layout)
    rng = np.random.default_rng(hq * 10 + hkv)
    b = paged_batch(rng, "mixed", num_q_per_kv=hq // hkv, num_kv_heads=hkv,
                    head_dim=head_dim, page_size=page_size, pad_tokens=4)
    # A stacked two-layer cache read at layer 1, laid out as the engine's (layer 0 holds
    # other values: the pages reversed).
    kv = layout.put(KVCache(pages=jnp.stack([b.kv_pages[::-1], b.kv_pages])))

    @jax.jit
    def paged(q, kv, page_tables, seq_ids, positions):
        attention = kernels.plan_paged_attention(
            seq_ids, positions, page_tables, num_q_per_kv=hq // hkv, page_size=page_size)
        return attention(q, *jax.tree.leaves(kv), page_tables, seq_ids, positions,
                         layer=jnp.int32(1))

    errs = {"paged": rel_err(paged(b.q, kv, b.page_tables, b.seq_ids, b.positions),
                             ragged_paged_attention_reference(*b.args))}
    q, k, v, w = (jnp.asarray(rng.standard_normal((1, 24, h, head_dim), np.float32))
                  for h in (hq, hkv, hkv, hq))
    flash = kernels.attention_fn()

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v) * w)

    def sharded(q, k, v):
        return flash(0, q, k, v, None)[0]

    got = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), argnums=(0, 1, 2)))(
        q, k, v)
    want = jax.value_and_grad(functools.partial(loss, dense_causal_attention_reference),
                              argnums=(0, 1, 2))(q, k, v)
    errs["flash"] = rel_err(got[0], want[0])
    for name, g, r in zip(("dq", "dk", "dv"), got[1], want[1], strict=True):
        errs[f"flash.{name}"] = rel_err(g, r)
    return {"errs": errs, "copies_kv": kernels.heads.copies_kv,
            "per_query": kernels.heads.per_query}


def cuda_lowering(cases: list[str]) -> dict:
    """Triton calls in the CUDA lowering (on this host, no GPU) of the compiled kernels
    under ``ShardedKernels`` at Llama-3.1-8B-like widths in bfloat16: paged attention with
    a column- and a row-parallel LoRA projection, and the flash pair's forward and
    backward. A case is ``HQ,HKV,MESH``."""
    from coserve_jax.config import ModelConfig
    from coserve_jax.kv_cache import KVCache
    from coserve_jax.sharded_kernels import ShardedKernels
    from pallas_kernels.dispatch import KernelOptions, Kernels
    from sharding import Layout

    shape, bf16, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
    hidden, head_dim, page_size, t, seqs, width, slots, rank = 4096, 128, 16, 64, 8, 12, 4, 16
    report = {}
    for case in cases:
        hq, hkv, spec = case.split(",", 2)
        hq, hkv = int(hq), int(hkv)
        cfg = ModelConfig.from_hf_dict(hf_config(hkv) | {
            "num_attention_heads": hq, "head_dim": head_dim, "hidden_size": hidden,
            "intermediate_size": 14336})
        layout = Layout(make_mesh(MeshConfig.parse(spec)), cfg)
        # The grouped kernel behind the conditional (the LoRA default off a GPU).
        kernels = ShardedKernels(Kernels(impl="kernel", options=KernelOptions(
            dense_lora=False, skip_unused_lora=True)), layout)
        # The LoRA choices measured on a GPU: the masked einsum on every step, no conditional.
        dense = ShardedKernels(Kernels(impl="kernel", options=KernelOptions(
            dense_lora=True, skip_unused_lora=False)), layout)
        pages = shape((2, 64, page_size, 2 * hkv, head_dim), bf16)

        def step(q, kv, tables, seq_ids, positions, x, a, b, scale, slot_ids, kernels=kernels,
                 hq=hq, hkv=hkv, model=layout.model_size):
            attention = kernels.plan_paged_attention(seq_ids, positions, tables,
                                                     num_q_per_kv=hq // hkv, page_size=page_size)
            out = attention(q, *jax.tree.leaves(kv), tables, seq_ids, positions,
                            layer=jnp.int32(1))
            lora = kernels.multi_slot_lora(scale, slot_ids)
            parts = lora.row_parallel_parts({"o_proj": (a, b)}, "o_proj",
                                            x.reshape(t, model, hidden // model))
            return out, lora({"q_proj": (a, b)}, "q_proj", x), parts

        args = (shape((t, hq, head_dim), bf16), KVCache(pages=pages),
                shape((seqs, width), i32), shape((t,), i32), shape((t,), i32),
                shape((t, hidden), bf16), shape((slots, hidden, rank), bf16),
                shape((slots, rank, hidden), bf16), shape((slots,), jnp.float32),
                shape((t,), i32))
        flash = kernels.attention_fn()

        def flash_fwd_bwd(q, k, v, w, flash=flash):
            out, pullback = jax.vjp(lambda q, k, v: flash(0, q, k, v, None)[0], q, k, v)
            return out, pullback(w)

        seq = [shape((1, 256, h, head_dim), bf16) for h in (hq, hkv, hkv, hq)]
        texts = {name: jax.jit(fn).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
                 for name, fn, a in (("step", step, args), ("flash", flash_fwd_bwd, seq),
                                     ("dense_step", functools.partial(step, kernels=dense),
                                      args))}
        report[case] = {name: text.count("__gpu$xla.gpu.triton")
                        for name, text in texts.items()}
        report[case] |= {f"{name}_conditionals": text.count("stablehlo.case")
                         + text.count("stablehlo.if") for name, text in texts.items()
                         if "step" in name}
    return report


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in compiled HLO text (async pairs counted once): in the
    whole program and inside the layer loop (the scan body, where LoRA runs)."""
    counts = {}
    for op in COLLECTIVES:
        lines = [line for line in hlo.splitlines()
                 if f" {op}(" in line or f" {op}-start(" in line]
        counts[op] = len(lines)
        counts[f"{op} in layer"] = sum("/while/body/" in line for line in lines)
    return counts


def collectives(model_dir: str, spec: str, kernels: str = "auto") -> dict:
    """Collectives of the compiled step with adapter slots (and tokens naming them) vs the
    same step with no LoRA work, for an inference and a finetuning bucket."""
    mesh = make_mesh(MeshConfig.parse(spec))
    model = cj.load_model(model_dir, progress=False, mesh=mesh)
    report = {}
    for name, extra in (("lora", {}), ("base", {"max_adapters": 0, "max_train_seqs": 0})):
        engine = cj.Engine(model, cj.EngineConfig.flat(**(ENGINE | extra), kernels=kernels),
                           mesh=mesh)
        for train in (False, True):
            if train and engine.trainer is None:
                continue
            chunk = SeqChunk(token_ids=[5] * 8, start_position=0, page_table=[0, 1],
                             adapter_slot=0 if engine.registry else -1)
            if train:
                chunk.labels = np.zeros(8, np.int32)
                chunk.loss_weights = np.ones(8, np.float32)
                chunk.act_base = 0
            batch = build_batch([chunk], Bucket(32, 4, 16, train), 4)
            r = engine.runner
            hlo = r.step.lower(model.params, r.slots, r.kv, r.train, r.feed, batch,
                               with_train=train).compile().as_text()
            report[f"{name}/{'train' if train else 'infer'}"] = count_collectives(hlo)
    return report


def reductions(hlo: str) -> list[dict]:
    """All-reduces and reduce-scatters of compiled HLO: result dims and replica group size."""
    out = []
    for line in hlo.splitlines():
        op = next((o for o in ("all-reduce", "reduce-scatter")
                   if f" {o}(" in line or f" {o}-start(" in line), None)
        if op is None:
            continue
        head = line.split(f" {op}", 1)[0].split("=", 1)[1]
        dims = [[int(d) for d in m.split(",") if d] for m in re.findall(r"\w+\[([\d,]*)\]", head)]
        out.append({"op": op, "dims": dims, "group": group_size(line)})
    return out


def group_size(line: str) -> int:
    """Devices per replica group, in any of the three ways XLA prints replica groups."""
    if m := re.search(r"replica_groups=\{\{([0-9,]+)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
    raise ValueError(f"unparsed replica groups: {line[:300]}")


def gradient_reductions(model_dir: str, spec: str) -> dict:
    """Reductions of the compiled backward piece and optimizer update on ``spec`` (with a
    data axis). The slots' rank is 7, a size no other dimension here has, so a reduction
    with a 7 in its shape is one of LoRA weights or gradients."""
    mesh = make_mesh(MeshConfig.parse(spec))
    model = cj.load_model(model_dir, progress=False, mesh=mesh)
    engine = cj.Engine(model, cj.EngineConfig.flat(**(ENGINE | {"max_lora_rank": 7})), mesh=mesh)
    trainer = engine.trainer
    seq = TrainSequence(tuple(range(3, 33)), (False, *[True] * 29))
    engine.submit_job(cj.FinetuneJob("job", Dataset([seq]), lora=cj.LoraConfig(
        r=7, lora_alpha=14, target_modules=ALL_TARGETS), max_steps=1))
    run = trainer.jobs["job"]
    piece = BackwardPiece(act_row=np.int32(0), layer_start=np.int32(0), length=np.int32(30),
                          adapter_slot=np.int32(run.slot))
    runner = engine.runner
    backward = runner.backward_program().lower(
        model.params, runner.slots, runner.train, piece, num_layers=1,
        seq_len=32).compile().as_text()
    job = runner.jobs["job"]
    update = job.update.lower(job.params, job.opt_state, runner.train, np.int32(run.slot),
                              np.float32(1)).compile().as_text()
    return {"backward": reductions(backward), "update": reductions(update)}


def main(argv: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    what, model_dir, *meshes = argv
    if what == "parity":
        print(json.dumps(parity(model_dir, meshes)))
    elif what == "parity-kept":  # the same with FinetuneConfig.keep_projections
        ENGINE["keep_projections"] = True
        print(json.dumps(parity(model_dir, meshes)))
    elif what == "kernels":
        print(json.dumps(kernel_parity(model_dir, meshes)))
    elif what == "kernels-dense":  # the same with the dense LoRA and no conditional
        print(json.dumps(kernel_parity(model_dir, meshes, dense_lora=True,
                                       skip_unused_lora=False)))
    elif what == "attention":  # HQ,HKV,MESH cases (no model directory)
        print(json.dumps(attention_parity([model_dir, *meshes])))
    elif what == "cuda":  # HQ,HKV,MESH cases (no model directory)
        print(json.dumps(cuda_lowering([model_dir, *meshes])))
    elif what == "hlo":  # MODEL_DIR MODEL_PARALLEL_MESH DATA_PARALLEL_MESH
        print(json.dumps({"forward": collectives(model_dir, meshes[0]),
                          "gradients": gradient_reductions(model_dir, meshes[1])}))
    elif what == "write-model":
        from coserve_jax.tiny_model import write_random_model

        os.makedirs(model_dir, exist_ok=True)
        write_random_model(model_dir, hf_config(int(meshes[0])), seed=7, head_std=0.2)
    else:
        raise SystemExit(f"unknown command {what}")


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before anything else prints
    main(sys.argv[1:])
