"""The ``coserve`` command line.

``coserve generate`` runs locally (or through a server with ``--server``); ``serve``,
``finetune``, ``jobs`` and ``adapters`` are the gRPC server and its client (their code
lives in ``server/commands.py``); ``demo`` is ``make demo``.
"""

from __future__ import annotations

import argparse

import coserve_jax


def _generate(args: argparse.Namespace) -> int:
    if args.server:
        from server.commands import remote_generate

        return remote_generate(args)
    model = coserve_jax.load_model(args.model or coserve_jax.tiny_model_dir(), dtype=args.dtype)
    if model.tokenizer is None:
        raise SystemExit(f"{model.path} has no tokenizer; cannot encode a text prompt")
    prompts = [model.tokenizer.encode(p) for p in args.prompt]
    if args.add_bos and model.tokenizer.bos_token_id is not None:
        prompts = [p if p[:1] == [model.tokenizer.bos_token_id]
                   else [model.tokenizer.bos_token_id, *p] for p in prompts]
    outs = coserve_jax.generate(model, prompts, args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                ignore_eos=args.ignore_eos)
    for text, ids in zip(args.prompt, outs, strict=True):
        print(f"{text}{model.tokenizer.decode(ids)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import main as demo_main

    return demo_main(args.demo_args)


def _add_generate(sub) -> None:
    from server.commands import add_client_options

    gen = sub.add_parser(
        "generate", help="generate text from prompts (locally, or through a server)",
        description="Generate continuations of text prompts. Without --server the engine "
                    "runs in this process; with --server the prompts stream through the gRPC "
                    "server (one after another, text printed as it arrives).")
    gen.add_argument("prompt", nargs="+", help="prompt text (several are batched together)")
    gen.add_argument("--model", help="Hugging Face model directory (default: embedded model; "
                     "local only)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="generate past EOS")
    gen.add_argument("--add-bos", action="store_true", help="put the tokenizer's BOS first")
    gen.add_argument("--adapter", help="LoRA adapter (or finetuning job) to use (server only)")
    gen.add_argument("--ttft-slo", type=float, help="time-to-first-token target, s (server)")
    gen.add_argument("--tpot-slo", type=float, help="time-per-output-token target, s (server)")
    add_client_options(gen, required=False)
    gen.set_defaults(func=_generate)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help="run the demo (make demo): server, mixed workload, summary",
        description="Start a server on the embedded model, stream Poisson-arriving requests "
                    "through it while a LoRA job learns a synthetic task, and print a summary. "
                    "Its options are python -m server.demo's: coserve demo --help lists "
                    "them.", add_help=True)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER,
                      help="demo options, e.g. --quick --json summary.json")
    demo.set_defaults(func=_demo)


def _plan(args: argparse.Namespace) -> int:
    from coserve_jax.plan import run_from_args

    return run_from_args(args)


def _add_plan(sub) -> None:
    from coserve_jax.plan import add_arguments

    plan = sub.add_parser(
        "plan", help="per-device memory of a deployment before launching it",
        description="Per device: weights, KV pages (and the tokens they hold), adapter slots, "
                    "finetuning buffers, job optimizer state and the step's temporaries (XLA "
                    "memory analysis of the sharded programs compiled on virtual CPU devices; "
                    "no accelerator or checkpoint needed), and whether it fits. Exit status 1 "
                    "if a row does not fit.")
    add_arguments(plan)
    plan.set_defaults(func=_plan)


def main(argv: list[str] | None = None) -> int:
    import sys

    from coserve_jax.logs import setup_logging
    from server import commands

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (coserve demo --help)
        return _demo(argparse.Namespace(demo_args=argv[1:]))
    parser = argparse.ArgumentParser(prog="coserve", description=coserve_jax.__doc__)
    commands.add_logging_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    commands.add_serve(sub)
    commands.add_finetune(sub)
    commands.add_jobs(sub)
    commands.add_adapters(sub)
    commands.add_profile(sub)
    _add_demo(sub)
    _add_plan(sub)

    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level, json_format=args.log_json)
    except ValueError as e:
        parser.error(str(e))
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"coserve: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
