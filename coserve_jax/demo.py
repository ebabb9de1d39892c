"""``make demo``: the engine on the embedded model, end to end.

Until the gRPC service lands this drives the engine in-process: it compiles
every bucket (with a progress bar), streams a mixed batch of requests through
continuous batching with chunked prefill, and prints a summary.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import coserve_jax
from coserve_jax import Engine, EngineConfig, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Co-serving means",
    "In a paged KV cache, every sequence",
    "Hello",
    "LoRA adapters are small",
    "One jitted step serves prefill and decode tokens together, so",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    path = args.model or coserve_jax.tiny_model_dir()
    print(f"model: {path}")
    model = coserve_jax.load_model(path)
    tok = model.tokenizer
    engine = Engine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))
    t0 = time.perf_counter()
    engine.warmup()
    print(f"compiled {len(engine.buckets)} buckets in {time.perf_counter() - t0:.1f}s")

    names = {}
    for i, text in enumerate(PROMPTS):
        sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True,
                                  temperature=0.0 if i % 2 == 0 else 0.8, seed=i)
        names[engine.add_request(tok.encode(text), sampling)] = text
    outputs, steps, generated = {}, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.new_token_ids)
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
        steps += 1
    elapsed = time.perf_counter() - t0
    for rid, ids in outputs.items():
        print(f"\n[{rid}] {names[rid]!r} ->\n    {tok.decode(ids)!r}")
    print(f"\n{len(outputs)} requests, {generated} tokens in {steps} steps, {elapsed:.2f}s "
          f"({generated / elapsed:.0f} tokens/s); KV pages in use after: "
          f"{engine.kv_usage().used_pages}")
    print("(random weights: the text is noise; the serving path is real)")
    return 0 if len(outputs) == len(PROMPTS) and all(np.size(v) for v in outputs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
