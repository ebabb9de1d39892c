"""Does a decode step read each layer's weights in place, or copy them out first?

On an H200 at Llama-3.1-8B shapes (2026-12-04, BENCHMARKS.md), a profile of the engine's
b=16 decode step showed 14.6 GB copied per step by 609 ``memcpy`` kernels (8.0 ms of a
14.6 ms device-busy step): each layer's 7 weight matrices, and its adapter slots, copied
out of the stacked ``[num_layers, ...]`` arrays that ``lax.scan`` slices, before the
matmuls read the copies. This script times the 32 decoder layers alone (16 tokens of one
position each, so attention is trivial and the weights are what is read) in three ways:

- ``scan``: ``llama.run_layers`` as a ``lax.scan`` over the stacked weights;
- ``loop-slices``: ``llama.run_layers`` as a Python loop over the same stacked arrays,
  indexed statically (``KernelConfig.unroll_layers``, a GPU's default since this script's
  second run: 4.36 ms against the scan's 11.96 ms);
- ``loop-arrays``: a Python loop over separate per-layer arrays (what an engine that
  keeps every layer's weights apart would pass), which no slice can copy;

the first two also with XLA options given to their ``jax.jit`` (``compiler_options``, so
one process tries them all): cuBLAS GEMMs instead of Triton ones
(``xla_gpu_enable_triton_gemm``), which XLA's dynamic-slice fusion can point at a slice
in place; that fusion asked for explicitly; and without the pass that turns dynamic
slices into memcpys. For each, the device time a ``jax.profiler`` trace gives to
``memcpy`` kernels. A variant whose options this XLA does not know records the error.
(The scan unrolled by ``lax.scan(unroll=True)`` read in place too, 4.44 ms, but took
43 s to compile against the loop's 4.3 s; it is no longer a variant.)

    python bench/layer_weights.py --tiny                     # the code path, on CPU
    python bench/layer_weights.py --json $OUT/lw.json        # on a GPU, about 2 minutes
    python bench/layer_weights.py --pick $OUT/lw.json        # coserve.py flags of the best
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
CUBLAS = {"xla_gpu_enable_triton_gemm": False}
VARIANTS = {  # name: (how the weights are read, compiler options); likeliest fixes first
    "scan": ("scan", {}),
    "loop-slices": ("loop-slices", {}),
    "scan, cuBLAS, dynamic-slice fusion": (
        "scan", CUBLAS | {"xla_gpu_enable_dynamic_slice_fusion": True}),
    "loop-arrays": ("loop-arrays", {}),
    "scan, cuBLAS": ("scan", CUBLAS),
    "loop-slices, cuBLAS": ("loop-slices", CUBLAS),
    "scan, no memcpy rewrite": (
        "scan", {"xla_disable_hlo_passes": "fusion-dynamic-memcpy-rewriter"}),
}


ENGINE_READINGS = {"scan": ["--no-unroll-layers"], "loop-slices": ["--unroll-layers"]}
"""The readings an engine can be configured for (``KernelConfig``), with their flags."""


def engine_flags(rows: list[dict], min_gain: float = 0.05, max_error: float = 0.05) -> str:
    """``coserve.py`` flags for the fastest variant an engine can be configured as, or ''
    when none beats the plain scan by ``min_gain`` (or the scan was not measured). A
    variant whose output strays more than ``max_error`` from the first is not a candidate:
    a fast wrong answer is not a fix."""
    timed = {r["variant"]: r for r in rows if "median_s" in r}
    if "scan" not in timed:
        return ""
    best = min((r for r in timed.values() if VARIANTS[r["variant"]][0] in ENGINE_READINGS
                and r["rel_err_vs_first"] <= max_error), key=lambda r: r["median_s"])
    if best["median_s"] > (1 - min_gain) * timed["scan"]["median_s"]:
        return ""
    reading, options = VARIANTS[best["variant"]]
    flags = list(ENGINE_READINGS[reading])
    if options:
        flags.append("--xla-options=" + ",".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()))
    return " ".join(flags)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny-8b-like shapes (2 layers), CPU")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=16, help="decode tokens (one per sequence)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="append one JSON line per variant here")
    p.add_argument("--pick", metavar="JSONL",
                   help="print coserve.py's flags for the best engine variant in a --json file")
    args = p.parse_args(argv)
    if args.pick:
        with open(args.pick) as f:
            print(engine_flags([json.loads(line) for line in f if line.strip()]))
        return []
    for path in (REPO_ROOT, BENCH_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)

    import engine_throughput as et
    import jax
    import jax.numpy as jnp
    import step_profile

    from coserve_jax.models import llama

    from benchlib import scratch_dir

    cfg = et.tiny_8b_like_config(2) if args.tiny else et.llama3_8b_config(32)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    layers = et.random_params(cfg, dtype).layers
    per_layer = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(cfg.num_layers)]
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(layers))
    x = jax.random.normal(jax.random.key(1), (args.batch, 1, cfg.hidden_size), dtype)
    positions = jnp.full((args.batch, 1), 100, jnp.int32)

    def loop_arrays(per_layer, x):
        cos, sin = llama.rope_cos_sin(cfg, positions)
        for i, lp in enumerate(per_layer):
            x, _ = llama.decoder_layer(cfg, lp, None, jnp.int32(i), x, cos, sin,
                                       llama.dense_attention, None)
        return x

    def forward(reading: str, options: dict):
        if reading == "loop-arrays":
            fn, weights = loop_arrays, per_layer
        else:
            def fn(w, x):
                return llama.run_layers(cfg, w, x, positions, llama.dense_attention,
                                        unroll=reading == "loop-slices")[0]
            weights = layers
        return jax.jit(fn, compiler_options=options or None), weights

    rows, first, first_name = [], None, None

    def keep(row: dict) -> None:
        """A variant's row, appended to ``--json`` as soon as it is known."""
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    for name in args.variants:
        reading, options = VARIANTS[name]
        fn, weights = forward(reading, options)
        t0 = time.perf_counter()
        try:
            out = fn(weights, x).block_until_ready()  # compiles
        except Exception as error:  # an option this XLA does not know, say
            row = {"variant": name, "compiler_options": options,
                   "error": f"{type(error).__name__}: {str(error)[:300]}"}
            keep(row)
            print(f"{name:36} failed: {row['error']}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        # The same function whichever way the weights are read: relative error against the
        # first variant (float32 arithmetic on CPU; bf16 fusions may round differently).
        out = out.astype(jnp.float32)
        if first is None:
            first, first_name = out, name
        rel_err = float(jnp.linalg.norm(out - first) / jnp.linalg.norm(first))
        def call(fn=fn, weights=weights):
            return fn(weights, x).block_until_ready()

        call()
        median_s = et.median_time(call, args.repeats)
        prof = step_profile.profile_steps(call, 5, scratch_dir("layer-weights-"))
        row = {"variant": name, "compiler_options": options, "layers": cfg.num_layers,
               "batch": args.batch, "dtype": jnp.dtype(dtype).name,
               "platform": jax.devices()[0].platform, "weight_bytes": weight_bytes,
               "median_s": median_s, "compile_s": compile_s,
               "rel_err_vs_first": rel_err,
               "device_busy_s": prof["device_busy_per_step_s"],
               "memcpy_s": prof["memcpy_per_step_s"],
               "top_ops": prof["top_ops"][:5]}
        keep(row)
        busy, copies = row["device_busy_s"], row["memcpy_s"]
        print(f"{name:36} {row['median_s'] * 1e3:8.2f} ms  compile {compile_s:5.1f} s  "
              f"device busy {'n/a' if busy is None else f'{busy * 1e3:.2f} ms'}  "
              f"memcpy {'n/a' if copies is None else f'{copies * 1e3:.2f} ms'}  "
              f"weights {weight_bytes / 1e9:.2f} GB  error vs {first_name} "
              f"{rel_err:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
