"""Protocol messages to engine objects and back, with validation that names the field.

Every check that can be made before the engine sees a request is made here, and
bounds are tighter than the engine's where a value the engine accepts could only
fail later, inside a step (a step's exception is a device failure and stops the
server), e.g. a negative seed or a warm-up longer than an optax schedule can count.
"""

from __future__ import annotations

import dataclasses
import math
import os

from coserve_jax.finetune.data import DataConfig, Dataset, from_records, load_jsonl
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.finetune.optim import OptimizerConfig
from coserve_jax.lora.config import ALL_TARGETS, LoraConfig
from coserve_jax.sampling import SamplingParams

from .paths import resolve_under
from .proto import coserve_pb2 as pb

MAX_STEPS = 10**9
MAX_SEQUENCES_PER_STEP = 65536
MAX_EPOCHS = 10**6
MAX_SEED = 2**63 - 1
MAX_STOP_TOKENS = 64
MAX_PROMPT_TOKENS = 1 << 20
MAX_PROMPT_CHARS = 1 << 20

JOB_STATES = {
    "queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING,
    "completed": pb.JOB_STATE_COMPLETED, "cancelled": pb.JOB_STATE_CANCELLED,
    "failed": pb.JOB_STATE_FAILED,
}
TERMINAL_STATES = ("completed", "cancelled", "failed")


def _prefixed(field: str, e: Exception) -> ValueError:
    message = str(e)
    return ValueError(message if message.startswith(field) else f"{field}.{message}")


# ----- generation ----------------------------------------------------------------------------

def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Engine sampling parameters, defaults filled in; ``ValueError`` names the field."""
    if len(msg.stop_token_ids) > MAX_STOP_TOKENS:
        raise ValueError(f"sampling.stop_token_ids has more than {MAX_STOP_TOKENS} entries")
    try:
        return SamplingParams(
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else 16,
            temperature=msg.temperature, top_k=msg.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            seed=msg.seed if msg.HasField("seed") else None,
            stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos)
    except ValueError as e:
        raise _prefixed("sampling", e) from None


def prompt_ids(request: pb.GenerateRequest, tokenizer) -> list[int]:
    """The prompt's token ids (text encoded with the tokenizer); the engine checks the ids."""
    has_text, has_ids = bool(request.prompt), bool(request.prompt_token_ids)
    if has_text == has_ids:
        raise ValueError("prompt: set exactly one of prompt (text) and prompt_token_ids")
    if has_ids:
        if len(request.prompt_token_ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt_token_ids: more than {MAX_PROMPT_TOKENS} tokens")
        ids = list(request.prompt_token_ids)
    else:
        if len(request.prompt) > MAX_PROMPT_CHARS:  # tokenizing runs on the event loop
            raise ValueError(f"prompt: more than {MAX_PROMPT_CHARS} characters")
        ids = list(tokenizer.encode(request.prompt))
    bos = getattr(tokenizer, "bos_token_id", None)
    if request.add_bos and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    if not ids:
        raise ValueError("prompt encodes to no tokens")
    return ids


def slo_targets(msg: pb.SloTargets) -> tuple[float, float]:
    for field in ("ttft_s", "tpot_s"):
        value = getattr(msg, field)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"slo.{field} must be a finite number >= 0, got {value!r}")
    return msg.ttft_s, msg.tpot_s


# ----- finetuning ----------------------------------------------------------------------------

def records(samples: pb.Samples) -> list[dict]:
    """Inline samples as the records ``from_records`` takes."""
    out: list[dict] = []
    for i, s in enumerate(samples.samples):
        kind = s.WhichOneof("kind")
        if kind == "text":
            out.append({"text": s.text})
        elif kind == "prompt_completion":
            out.append({"prompt": s.prompt_completion.prompt,
                        "completion": s.prompt_completion.completion})
        elif kind == "conversation":
            out.append({"messages": [{"role": m.role, "content": m.content}
                                     for m in s.conversation.messages]})
        else:
            raise ValueError(f"samples.samples[{i}]: set one of text, prompt_completion and "
                             "conversation")
    return out


def _int(request, field: str, default: int, lo: int, hi: int) -> int:
    value = getattr(request, field) or default
    if not lo <= value <= hi:
        raise ValueError(f"{field} must be in [{lo}, {hi}], got {value}")
    return value


def lora_config(msg: pb.LoraSpec, max_rank: int) -> LoraConfig:
    r = msg.r or 8
    if not 1 <= r <= max_rank:
        raise ValueError(f"lora.r must be in [1, {max_rank}] (the engine's max_lora_rank), "
                         f"got {r}")
    alpha = msg.lora_alpha or 2.0 * r
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora.lora_alpha must be a positive number, got {alpha!r}")
    targets = tuple(msg.target_modules) or ("q_proj", "v_proj")
    for t in targets:
        if t not in ALL_TARGETS:
            raise ValueError(f"lora.target_modules: unknown module {t!r}; supported: "
                             f"{list(ALL_TARGETS)}")
    return LoraConfig(r=r, lora_alpha=float(alpha), target_modules=targets,
                      use_rslora=msg.use_rslora)


def optimizer_config(msg: pb.OptimizerSpec) -> OptimizerConfig:
    for field in ("learning_rate", "weight_decay", "momentum", "max_grad_norm"):
        value = getattr(msg, field)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"optimizer.{field} must be a finite number >= 0, got {value!r}")
    if msg.learning_rate > 10:
        raise ValueError(f"optimizer.learning_rate must be at most 10, got {msg.learning_rate}")
    if not 0 <= msg.warmup_steps <= MAX_STEPS:
        raise ValueError(f"optimizer.warmup_steps must be in [0, {MAX_STEPS}], got "
                         f"{msg.warmup_steps}")
    clip = msg.max_grad_norm if msg.HasField("max_grad_norm") else 1.0
    try:
        return OptimizerConfig(
            name=msg.name or "adamw", learning_rate=msg.learning_rate or 1e-3,
            schedule=msg.schedule or "constant", warmup_steps=msg.warmup_steps,
            weight_decay=msg.weight_decay, momentum=msg.momentum,
            max_grad_norm=clip if clip > 0 else None)
    except ValueError as e:
        raise _prefixed("optimizer", e) from None


def dataset(request: pb.SubmitFinetuneRequest, tokenizer, max_train_len: int,
            data_root: str | None) -> Dataset:
    """Tokenized training sequences of inline samples or a JSONL file under the data root."""
    max_seq_len = _int(request, "max_seq_len", max_train_len, 2, max_train_len)
    config = DataConfig(max_seq_len=max_seq_len, overlong=request.overlong or "truncate")
    which = request.WhichOneof("data")
    if which == "samples":
        if not request.samples.samples:
            raise ValueError("samples: no samples given")
        try:
            return from_records(records(request.samples), tokenizer, config)
        except ValueError as e:
            raise _prefixed("samples", e) from None
    if which == "dataset_path":
        path = resolve_under(data_root, request.dataset_path, "dataset_path", "data root")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset_path: no file {request.dataset_path!r} under "
                                    "the data root")
        try:
            return load_jsonl(path, tokenizer, config)
        except ValueError as e:  # messages name the server's path: show the client's
            raise ValueError(f"dataset_path: {e}".replace(path, request.dataset_path)) from None
    raise ValueError("data: set samples or dataset_path")


def finetune_job(request: pb.SubmitFinetuneRequest, internal: str, tokenizer,
                 max_train_len: int, max_rank: int, data_root: str | None,
                 checkpoint_dir: str | None, export_dir: str | None) -> FinetuneJob:
    """The engine's job for a request; ``ValueError`` (or ``FileNotFoundError``) names the field."""
    if max_train_len < 2:
        raise ValueError("this server does not finetune (EngineConfig.max_train_seqs=0)")
    lora = lora_config(request.lora, max_rank)
    optimizer = optimizer_config(request.optimizer)
    max_steps = request.max_steps or None
    if max_steps is not None:
        _int(request, "max_steps", 0, 1, MAX_STEPS)
    epochs = _int(request, "epochs", 1, 1, MAX_EPOCHS)
    sequences_per_step = _int(request, "sequences_per_step", 8, 1, MAX_SEQUENCES_PER_STEP)
    checkpoint_every = _int(request, "checkpoint_every", 0, 0, MAX_STEPS)
    seed = _int(request, "seed", 0, 0, MAX_SEED)
    weight = request.weight or 1.0
    if not math.isfinite(weight) or not 0 < weight <= 1e6:
        raise ValueError(f"weight must be in (0, 1e6], got {weight!r}")
    if request.overlong not in ("", "truncate", "refuse", "skip"):
        raise ValueError(f"overlong must be truncate, refuse or skip, got {request.overlong!r}")
    data = dataset(request, tokenizer, max_train_len, data_root)
    job = FinetuneJob(name=internal, dataset=data, lora=lora, optimizer=optimizer,
                      sequences_per_step=sequences_per_step, max_steps=max_steps,
                      epochs=epochs, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, export_dir=export_dir, seed=seed,
                      weight=float(weight))
    if job.total_steps > MAX_STEPS:
        raise ValueError(f"the job would take {job.total_steps} optimizer steps, more than "
                         f"{MAX_STEPS}: lower epochs or set max_steps")
    return job


def progress_dict(p: JobProgress) -> dict:
    """A JSON-able snapshot (without the per-step loss list, kept short)."""
    d = dataclasses.asdict(p)
    losses = d.pop("losses")
    d["first_loss"] = losses[0] if losses else None
    d["recent_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
    return d


def job_message(name: str, progress: dict, resumed_from_step: int, num_samples: int) -> pb.Job:
    """A ``Job`` from a :func:`progress_dict` snapshot and the server's record of the job."""
    job = pb.Job(name=name, state=JOB_STATES.get(progress["state"], pb.JOB_STATE_UNSPECIFIED),
                 step=progress["step"], total_steps=progress["total_steps"],
                 learning_rate=progress.get("learning_rate") or 0.0,
                 tokens_trained=progress["tokens_trained"],
                 tokens_per_s=progress["tokens_per_s"], epoch=progress["epoch"],
                 error=progress.get("error") or "", resumed_from_step=resumed_from_step,
                 num_samples=num_samples)
    for field in ("loss", "first_loss", "recent_loss", "grad_norm"):
        if progress.get(field) is not None and math.isfinite(progress[field]):
            setattr(job, field, progress[field])
    return job


def adapter_message(name: str, kind: int, config: LoraConfig, path: str = "") -> pb.Adapter:
    return pb.Adapter(name=name, kind=kind, r=config.r, lora_alpha=config.lora_alpha,
                      target_modules=list(config.target_modules),
                      use_rslora=config.use_rslora, path=path)
