"""The server-side ``coserve`` subcommands: ``serve``, ``finetune``, ``jobs``, ``adapters``,
and remote ``generate`` (``server/cli.py`` registers them)."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PORT = 50051


def default_address() -> str:
    return os.environ.get("COSERVE_SERVER", f"127.0.0.1:{DEFAULT_PORT}")


# ----- serve ---------------------------------------------------------------------------------

def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the gRPC server (inference and finetuning on one engine)",
        description="Serve the coserve.v1 gRPC API (plus grpc.health.v1 and reflection) on "
                    "one engine. SIGTERM or Ctrl-C drains: no new requests, in-flight ones "
                    "finish (up to --drain-timeout), running jobs are checkpointed. Jobs "
                    "resume from --state-dir when the server starts again.")
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--config", help="JSON file of EngineConfig fields, e.g. configs/demo.json")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: any free)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /v1/files, /v1/fine_tuning/jobs) on "
                   "this port, on the same engine, tokens and caps (default: none; 0: any "
                   "free)")
    p.add_argument("--served-model-name", help="the base model's name in the HTTP API "
                   "(default: the model directory's name)")
    p.add_argument("--http-max-body-mb", type=float, default=4.0,
                   help="largest HTTP JSON body (MiB; 413 above it)")
    p.add_argument("--http-max-upload-mb", type=float, default=64.0,
                   help="largest file upload to /v1/files (MiB)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default: no endpoint; 0: any free)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--tokens-file", help="'TOKEN TENANT' per line; without it there is no "
                   "authentication and a single tenant")
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to "
                   "(mutual TLS)")
    p.add_argument("--profile-dir", help="trace the first --profile-steps engine steps "
                   "into DIR once the engine is warm (jax.profiler; open with TensorBoard), "
                   "and make DIR the root of the Profile RPC (default root: "
                   "STATE_DIR/profiles)")
    p.add_argument("--profile-steps", type=int, default=20,
                   help="engine steps the start-up trace covers (with --profile-dir)")
    p.add_argument("--run-dir", help="TensorBoard scalars (serving and job curves) go here "
                   "(EngineConfig.run_dir; overrides --config)")
    p.add_argument("--kernels", metavar="IMPL",
                   help="attention and LoRA implementations (EngineConfig.kernels; overrides "
                   "--config): auto (Pallas kernels on GPU/TPU, jnp references on CPU), "
                   "kernel, reference, or interpret (kernels in Pallas interpret mode)")
    p.add_argument("--data-root", help="directory that dataset_path in requests is relative to")
    p.add_argument("--adapter-root", help="directory that adapter paths in requests are "
                   "relative to (LoadAdapter, ExportAdapter)")
    p.add_argument("--state-dir", default=None, help="job specs and checkpoints (default: "
                   "$COSERVE_HOME/server-state, i.e. ~/.cache/coserve_jax/server-state)")
    p.add_argument("--max-streams", type=int, default=256, help="open Generate streams at most")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting for their first token at most")
    p.add_argument("--max-jobs", type=int, default=4, help="running finetuning jobs at most")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a shutdown waits for in-flight requests")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every bucket up front (first requests compile)")
    add_logging_options(p, subcommand=True)
    from sharding.launch import add_arguments as add_launch_arguments

    add_launch_arguments(p)  # --mesh and the multi-host flags
    # A deterministic engine without a model, for tests of the server itself: a JSON
    # object of MockEngine arguments.
    p.add_argument("--mock-engine", help=argparse.SUPPRESS)
    p.set_defaults(func=serve_command)


def add_logging_options(p: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """``--log-level`` and ``--log-json``. On a subcommand they default to SUPPRESS, so the
    top-level parser's values (``coserve --log-json serve``) are kept unless repeated."""
    p.add_argument("--log-level", default=argparse.SUPPRESS if subcommand else "INFO",
                   help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-json", action="store_true",
                   default=argparse.SUPPRESS if subcommand else False,
                   help="log one JSON object per line on stderr")


def engine_config_from_file(path: str):
    """An ``EngineConfig`` from a JSON object of its flat fields (``EngineConfig.flat``);
    unknown keys are refused."""
    from coserve_jax import EngineConfig
    from coserve_jax.engine_config import FLAT_FIELDS

    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of EngineConfig fields")
    unknown = sorted(set(raw) - set(FLAT_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown EngineConfig field(s) {unknown}")
    if isinstance(raw.get("lora_target_modules"), list):
        raw["lora_target_modules"] = tuple(raw["lora_target_modules"])
    return EngineConfig.flat(**raw)


def engine_config_from_args(args: argparse.Namespace):
    """The ``EngineConfig`` of ``serve``: ``--config``'s fields, then the flags that override
    them (``--run-dir``, ``--kernels``); None when neither is given (the default config)."""
    engine_config = engine_config_from_file(args.config) if args.config else None
    overrides = {name: value for name, value in (("run_dir", args.run_dir),
                                                 ("kernels", args.kernels)) if value}
    if overrides:
        from coserve_jax import EngineConfig

        engine_config = (engine_config or EngineConfig()).replace(**overrides)
    return engine_config


def serve_command(args: argparse.Namespace) -> int:
    from coserve_jax.logs import setup_logging
    from coserve_jax.tiny_model import cache_root

    from .app import ServerConfig, serve
    from .engine_api import real_backend
    from .service import Limits

    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_json", False))
    config = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, tokens_file=args.tokens_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, data_root=args.data_root,
        adapter_root=args.adapter_root,
        state_dir=args.state_dir or os.path.join(cache_root(), "server-state"),
        profile_dir=args.profile_dir, profile_steps=args.profile_steps,
        limits=Limits(max_streams=args.max_streams, max_queue=args.max_queue,
                      max_jobs=args.max_jobs),
        drain_timeout=args.drain_timeout, http_port=args.http_port,
        served_model_name=args.served_model_name,
        http_max_body_bytes=int(args.http_max_body_mb * (1 << 20)),
        http_max_upload_bytes=int(args.http_max_upload_mb * (1 << 20)))
    if args.mock_engine is not None:
        from .mock_engine import mock_backend

        backend = mock_backend(**json.loads(args.mock_engine or "{}"))
        return serve(backend, config, announce=lambda line: print(line, flush=True))
    from sharding.distributed import run_spmd
    from sharding.launch import setup

    launch = setup(args)  # before any device use: jax.distributed, then the mesh
    engine_config = engine_config_from_args(args)
    backend = real_backend(args.model, engine_config, dtype=args.dtype,
                           warmup=not args.no_warmup, mesh=launch.mesh)
    # Process 0 serves gRPC; the other processes (multi-host) follow its engine steps.
    code = run_spmd(backend.engine, lambda engine: serve(
        backend, config, announce=lambda line: print(line, flush=True)))
    return 0 if code is None else code


# ----- client options ------------------------------------------------------------------------

def add_client_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--server`` and how to reach it (token, TLS)."""
    if required:
        p.add_argument("--server", default=default_address(),
                       help="server address HOST:PORT (default: $COSERVE_SERVER or "
                            f"127.0.0.1:{DEFAULT_PORT})")
    else:
        p.add_argument("--server", default=None,
                       help="generate through the gRPC server at HOST:PORT instead of locally")
    p.add_argument("--token", default=os.environ.get("COSERVE_TOKEN"),
                   help="bearer token (default: $COSERVE_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server with")
    p.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM), for mutual TLS")
    p.add_argument("--tls-server-name", help="name to expect in the server's certificate")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call (s)")


def client_from_args(args: argparse.Namespace):
    from .client import Client

    return Client(args.server, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                  tls_key=args.tls_key, server_name=args.tls_server_name)


def _rpc_errors(fn):
    """Turns a gRPC error into a one-line message and exit code 1."""
    import functools

    import grpc

    @functools.wraps(fn)
    def wrapper(args):
        try:
            return fn(args)
        except grpc.RpcError as e:
            print(f"coserve: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return wrapper


# ----- generate (remote) ---------------------------------------------------------------------

@_rpc_errors
def remote_generate(args: argparse.Namespace) -> int:
    """Streams each prompt's text as it arrives; a summary line per request on stderr."""
    from .client import generate_request

    with client_from_args(args) as client:
        for prompt in args.prompt:
            request = generate_request(
                prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, adapter=args.adapter or "",
                add_bos=args.add_bos, ttft_s=args.ttft_slo or 0.0, tpot_s=args.tpot_slo or 0.0,
                ignore_eos=args.ignore_eos)
            sys.stdout.write(prompt)
            for message in client.stream(request, timeout=args.timeout):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.HasField("result"):
                    r = message.result
                    sys.stdout.write("\n")
                    print(f"[{r.finish_reason}: {r.completion_tokens} tokens, "
                          f"TTFT {r.ttft_s * 1e3:.0f} ms, TPOT {r.tpot_s * 1e3:.1f} ms"
                          f"{'' if r.slo_attained else ', SLO missed'}]", file=sys.stderr)
    return 0


# ----- finetune ------------------------------------------------------------------------------

def add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="submit a LoRA finetuning job to a server and watch it",
        description="Submit a LoRA finetuning job and follow it with a progress bar (Ctrl-C "
                    "stops watching; the job keeps running). Data: a local JSONL file sent "
                    "inline (--data), a JSONL file under the server's --data-root "
                    "(--dataset-path), or a built-in synthetic task (--synthetic).")
    add_client_options(p)
    p.add_argument("name", help="job name; its adapter is served under this name")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="local JSONL file ({text} | {prompt, completion} | "
                      "{messages}), sent with the request")
    data.add_argument("--dataset-path", help="JSONL file relative to the server's data root")
    data.add_argument("--synthetic", metavar="KIND[:N]", help="a synthetic task: reverse, "
                      "copy, uppercase or add, with N samples (default 1024)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (default 2r)")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated projections, or 'all'")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: run --epochs)")
    p.add_argument("--epochs", type=int, default=0, help="passes over the data (default 1)")
    p.add_argument("--sequences-per-step", type=int, default=0, help="default 8")
    p.add_argument("--max-seq-len", type=int, default=0, help="default: the server's limit")
    p.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-watch", action="store_true", help="submit and return")
    p.set_defaults(func=finetune_command)


def _records(args: argparse.Namespace) -> list[dict] | None:
    if args.data:
        records = []
        with open(args.data, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{args.data}, line {number}: {e}") from None
        return records
    if args.synthetic:
        from coserve_jax.finetune.data import synthetic_task

        kind, _, n = args.synthetic.partition(":")
        return synthetic_task(kind, int(n or 1024), seed=args.seed)
    return None


@_rpc_errors
def finetune_command(args: argparse.Namespace) -> int:
    from coserve_jax.lora.config import ALL_TARGETS

    from .client import finetune_request

    targets = ALL_TARGETS if args.targets == "all" else tuple(
        t.strip() for t in args.targets.split(",") if t.strip())
    request = finetune_request(
        args.name, records=_records(args), dataset_path=args.dataset_path, r=args.r,
        lora_alpha=args.alpha, target_modules=targets, learning_rate=args.lr,
        optimizer=args.optimizer, schedule=args.schedule, max_steps=args.steps,
        epochs=args.epochs, sequences_per_step=args.sequences_per_step,
        max_seq_len=args.max_seq_len, checkpoint_every=args.checkpoint_every, seed=args.seed)
    with client_from_args(args) as client:
        job = client.submit_finetune(request, timeout=args.timeout)
        print(f"submitted job {job.name}: {job.num_samples} samples, {job.total_steps} steps"
              + (f", resumed at step {job.resumed_from_step}" if job.resumed_from_step else ""))
        if args.no_watch:
            return 0
        try:
            job = watch(client, args.name)
        except KeyboardInterrupt:
            print("stopped watching; the job keeps running", file=sys.stderr)
            return 130
        print(describe_job(job))
        return 0 if job.state != _pb().JOB_STATE_FAILED else 1


def _pb():
    from .proto import coserve_pb2

    return coserve_pb2


def watch(client, name: str, interval: float = 0.5, file=None):
    """Follows a job with a tqdm bar until it ends; returns its last state."""
    from tqdm.auto import tqdm

    from .client import JOB_STATE_NAMES

    last = None
    with tqdm(desc=name, unit="step", file=file or sys.stderr, dynamic_ncols=True) as bar:
        for job in client.watch_job(name, interval_s=interval):
            bar.total = job.total_steps
            bar.n = job.step
            postfix = {"state": JOB_STATE_NAMES[job.state].upper()[:4],
                       "tok/s": f"{job.tokens_per_s:.0f}"}
            if job.HasField("loss"):
                postfix["loss"] = f"{job.loss:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            last = job
    return last


def describe_job(job) -> str:
    from .client import JOB_STATE_NAMES

    loss = f"{job.first_loss:.3f} -> {job.recent_loss:.3f}" if job.HasField("recent_loss") \
        else "-"
    text = (f"{job.name}: {JOB_STATE_NAMES[job.state]}, step {job.step}/{job.total_steps}, "
            f"loss {loss}, {job.tokens_trained} tokens ({job.tokens_per_s:.0f}/s)")
    if job.resumed_from_step:
        text += f", resumed at step {job.resumed_from_step}"
    if job.error:
        text += f", error: {job.error}"
    return text


# ----- jobs, adapters ------------------------------------------------------------------------

def add_jobs(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect, watch or cancel finetuning jobs",
                       description="Finetuning jobs of your tenant on a server.")
    add_client_options(p)
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "get", "watch", "cancel"])
    p.add_argument("name", nargs="?", help="job name (get, watch, cancel)")
    p.set_defaults(func=jobs_command)


@_rpc_errors
def jobs_command(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise ValueError(f"'jobs {args.action}' needs a job name")
    with client_from_args(args) as client:
        if args.action == "list":
            jobs = client.list_jobs(timeout=args.timeout)
            for job in jobs:
                print(describe_job(job))
            if not jobs:
                print("no jobs")
        elif args.action == "get":
            print(describe_job(client.get_job(args.name, timeout=args.timeout)))
        elif args.action == "watch":
            print(describe_job(watch(client, args.name)))
        else:
            print(describe_job(client.cancel_job(args.name, timeout=args.timeout)))
    return 0


def add_adapters(sub) -> None:
    p = sub.add_parser(
        "adapters", help="list, load, unload or export LoRA adapters",
        description="LoRA adapters of your tenant on a server. Paths are relative to the "
                    "server's --adapter-root. 'load PATH' reads a PEFT directory; 'export "
                    "NAME PATH' writes one (from a loaded adapter or a job's latest weights).")
    add_client_options(p)
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "load", "unload", "export"])
    p.add_argument("args", nargs="*", help="load: PATH; unload: NAME; export: NAME PATH")
    p.add_argument("--name", default="", help="load: name to serve it under (default: the "
                   "directory's name)")
    p.add_argument("--replace", action="store_true", help="load: replace a loaded adapter")
    p.add_argument("--overwrite", action="store_true", help="export: replace the directory")
    p.set_defaults(func=adapters_command)


@_rpc_errors
def adapters_command(args: argparse.Namespace) -> int:
    want = {"list": 0, "load": 1, "unload": 1, "export": 2}[args.action]
    if len(args.args) != want:
        raise ValueError(f"'adapters {args.action}' takes {want} argument(s)")
    kinds = {1: "loaded", 2: "finetune"}
    with client_from_args(args) as client:
        if args.action == "list":
            adapters = client.list_adapters(timeout=args.timeout)
            for a in adapters:
                print(f"{a.name}\t{kinds.get(a.kind, '?')}\tr={a.r} alpha={a.lora_alpha:g}\t"
                      f"{','.join(a.target_modules)}\t{a.path}")
            if not adapters:
                print("no adapters")
        elif args.action == "load":
            a = client.load_adapter(args.args[0], name=args.name, replace=args.replace,
                                    timeout=args.timeout)
            print(f"loaded {a.name} (r={a.r}, {','.join(a.target_modules)})")
        elif args.action == "unload":
            client.unload_adapter(args.args[0], timeout=args.timeout)
            print(f"unloaded {args.args[0]}")
        else:
            path = client.export_adapter(*args.args, overwrite=args.overwrite,
                                         timeout=args.timeout)
            print(f"exported {args.args[0]} to {path}")
    return 0


# ----- profile -------------------------------------------------------------------------------

def add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="trace the server's next engine steps (jax.profiler)",
        description="Ask a server to capture a jax.profiler trace of its next --steps engine "
                    "steps into --dir, relative to the server's profile root (its "
                    "--profile-dir, or STATE_DIR/profiles). Open it with TensorBoard's "
                    "profile plugin. The trace is written once the steps have run.")
    add_client_options(p)
    p.add_argument("--dir", required=True, help="directory under the server's profile root")
    p.add_argument("--steps", type=int, default=20, help="engine steps to trace")
    p.set_defaults(func=profile_command)


@_rpc_errors
def profile_command(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        path = client.profile(args.dir, args.steps, timeout=args.timeout)
    print(f"profiling the next {args.steps} steps into {path} (under the profile root)")
    return 0
