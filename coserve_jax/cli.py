"""The ``coserve`` command line."""

from __future__ import annotations

import argparse

import coserve_jax


def _generate(args: argparse.Namespace) -> int:
    model = coserve_jax.load_model(args.model or coserve_jax.tiny_model_dir(), dtype=args.dtype)
    if model.tokenizer is None:
        raise SystemExit(f"{model.path} has no tokenizer; cannot encode a text prompt")
    prompts = [model.tokenizer.encode(p) for p in args.prompt]
    outs = coserve_jax.generate(model, prompts, args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for text, ids in zip(args.prompt, outs, strict=True):
        print(f"{text}{model.tokenizer.decode(ids)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from coserve_jax.demo import main as demo_main

    return demo_main([] if args.model is None else ["--model", args.model])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coserve", description=coserve_jax.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from prompts with the engine")
    gen.add_argument("prompt", nargs="+", help="prompt text (several are batched together)")
    gen.add_argument("--model", help="Hugging Face model directory (default: embedded model)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="run the demo on the embedded model")
    demo.add_argument("--model", help="model directory (default: embedded model)")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"coserve: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
