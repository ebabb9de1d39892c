"""The narrow engine interface the server drives, and what the server needs beside it.

The server never reaches into an engine beyond :class:`ServingEngine` (JetStream
style): the real :class:`coserve_jax.Engine` implements it as it is, and
:class:`server.mock_engine.MockEngine` implements it deterministically without
running a model, so the server's threading can be tested quickly on CPU.

A :class:`Backend` bundles an engine with the host-side pieces the service needs and
the engine does not own: the tokenizer (text prompts, text deltas, datasets) and the
model config (reading PEFT adapters for this model's shapes).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Protocol, runtime_checkable

from coserve_jax.config import ModelConfig
from coserve_jax.engine import RequestOutput
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.kv_cache import KVUsage
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


@runtime_checkable
class ServingEngine(Protocol):
    """Everything the server (gRPC service, HTTP API, engine thread) calls on an engine,
    always from its one engine thread.

    Errors are the types of :mod:`coserve_jax.errors`, which the server maps to statuses
    by type (:func:`server.service.classify`): ``InvalidRequest`` (bad input; the message
    names the field), ``NotFound`` (no such request, adapter or job), ``AlreadyExists``
    (the name is taken), ``InUse`` (the thing is busy: FAILED_PRECONDITION),
    ``CapacityExhausted`` (no free adapter slot) and ``AdmissionError`` (a request refused
    at admission). They subclass ``ValueError`` (``NotFound``: ``KeyError``). Any
    exception from ``step`` is a device failure: the engine serves nothing after it.

    Beside the members below, the server reads ``config.default_ttft_s`` /
    ``config.default_tpot_s`` (an SLO's unset target) when an engine has them
    (``getattr``: an engine without them still serves).
    """

    max_model_len: int
    """The longest prompt plus output a request may have (the HTTP API's default
    ``max_tokens`` fills the rest)."""

    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    **slo_kwargs: Any) -> str:
        """Validates and queues a request; returns its id.

        Raises ``InvalidRequest`` for a bad prompt (empty, a token outside the vocabulary,
        too long for the model or the KV cache), bad ``params`` or an ``adapter`` that is
        not loaded, and ``AlreadyExists`` for a ``request_id`` in use. Engines that
        schedule for latency targets also take ``slo`` (a ``coserve_jax.slo.SLO``) and
        ``arrival_time`` (``time.monotonic()`` clock); the server passes them only to
        engines whose signature has them (:func:`accepts_slo`). A refusal at admission
        (queue full, TTFT target hopeless) raises ``AdmissionError``.
        """
        ...

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its pages; False if it is unknown (or finished).
        Never raises."""
        ...

    def step(self) -> list[RequestOutput]:
        """Runs one iteration (inference and finetuning); the outputs of the requests that
        advanced, each with its ``request_id``. Any exception is a device failure."""
        ...

    def has_unfinished(self) -> bool:
        """Requests or finetuning jobs still have work (``step`` has something to do)."""
        ...

    def kv_usage(self) -> KVUsage:
        """A snapshot of KV page usage."""
        ...

    def load_adapter(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Writes an adapter into a slot under ``adapter.name``; requests can name it at
        once. Raises ``AlreadyExists`` for a loaded name without ``replace``, ``InUse``
        for the name of a finetuning job, ``CapacityExhausted`` when every slot is taken,
        ``InvalidRequest`` for an adapter the slots cannot hold (rank, modules, shapes)."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Frees an adapter's slot. Raises ``NotFound`` for an unknown name, ``InUse``
        while requests use it or when it is a finetuning job's (remove the job instead)."""
        ...

    def adapters(self) -> list[str]:
        """Names in the adapter slots, finetuning jobs' adapters included."""
        ...

    def submit_job(self, job: FinetuneJob) -> JobProgress:
        """Starts a finetuning job, resuming from its checkpoint directory if one is there.
        Raises ``AlreadyExists`` when an adapter or job has its name,
        ``CapacityExhausted`` when no adapter slot is free, ``InvalidRequest`` for a job
        the engine cannot train (a sequence too long, a rank above the slots', an engine
        that does not finetune)."""
        ...

    def job_progress(self, name: str) -> JobProgress:
        """A snapshot of a job. Raises ``NotFound`` for an unknown job."""
        ...

    def cancel_job(self, name: str) -> None:
        """Stops a running job (a no-op for a finished one); its adapter stays loaded.
        Raises ``NotFound`` for an unknown job."""
        ...

    def checkpoint_job(self, name: str) -> int | None:
        """Checkpoints a running job now (a drain does, before a restart); the step saved,
        or None if it has no checkpoint directory or is not running. Raises ``NotFound``
        for an unknown job."""
        ...

    def remove_job(self, name: str) -> None:
        """Forgets a completed, cancelled or failed job and frees its adapter slot.
        Raises ``NotFound`` for an unknown job, ``InUse`` for one still running."""
        ...

    def trained_adapter(self, name: str) -> LoraAdapter:
        """A job's adapter with the weights of its latest optimizer step. Raises
        ``NotFound`` for an unknown job."""
        ...

    def start_profile(self, log_dir: str, num_steps: int) -> None:
        """Captures a trace of the next ``num_steps`` steps into ``log_dir``. Raises
        ``InvalidRequest`` for ``num_steps < 1``, ``InUse`` while a trace is captured."""
        ...

    def close(self) -> None:
        """Ends a trace in progress and flushes what the engine writes (TensorBoard
        events); the engine thread calls it once, when it stops."""
        ...


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the server and the dataset builder use."""

    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclasses.dataclass
class Backend:
    """An engine plus the host-side pieces the service needs."""

    engine: ServingEngine
    tokenizer: Any
    """Encodes text prompts and datasets, decodes text deltas (see :class:`Tokenizer`)."""
    model_config: ModelConfig
    """Shapes that adapters read from disk must match."""
    max_lora_rank: int
    """Largest adapter rank the engine's slots hold."""
    max_train_len: int
    """Longest finetuning sequence the engine takes (0: the engine does not finetune)."""
    model_name: str = ""
    """Where the model came from, for logs and ``base_model_name_or_path``."""


def real_backend(model_path: str | None = None, engine_config=None, dtype: str = "float32",
                 warmup: bool = True, progress: bool = True, mesh=None) -> Backend:
    """Loads a model (default: the embedded one), builds the engine and compiles it;
    with a ``mesh``, both are sharded over it."""
    import coserve_jax

    path = model_path or coserve_jax.tiny_model_dir()
    model = coserve_jax.load_model(path, dtype=dtype, progress=progress, mesh=mesh)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; the server needs one for text and datasets")
    engine = coserve_jax.Engine(model, engine_config, mesh=mesh)
    if warmup:
        engine.warmup(progress=progress)
    return Backend(engine=engine, tokenizer=model.tokenizer, model_config=model.config,
                   max_lora_rank=engine.config.adapters.max_lora_rank,
                   max_train_len=0 if engine.trainer is None else engine.trainer.config.max_len,
                   model_name=path)


def accepts_slo(engine: ServingEngine) -> bool:
    """Whether ``engine.add_request`` takes ``slo`` and ``arrival_time``."""
    try:
        parameters = inspect.signature(engine.add_request).parameters
    except (TypeError, ValueError):
        return False
    return "slo" in parameters and "arrival_time" in parameters


def make_slo(engine: ServingEngine, ttft_s: float, tpot_s: float):
    """The engine's ``SLO`` for a request's targets (0: the engine's default), or None
    when the request sets none (the engine then applies its defaults itself)."""
    if ttft_s <= 0 and tpot_s <= 0:
        return None
    from coserve_jax.slo import SLO

    scheduling = getattr(getattr(engine, "config", None), "scheduling", None)
    return SLO(ttft_s if ttft_s > 0 else getattr(scheduling, "default_ttft_s", 1e9),
               tpot_s if tpot_s > 0 else getattr(scheduling, "default_tpot_s", 1e9))


def checkpoint_job(engine: ServingEngine, name: str) -> int | None:
    """Checkpoints a running job now (for a drain); returns the step saved, or None.

    The checkpoint holds the last optimizer step and the data position at that step
    boundary: gradients of the unfinished step are not saved, so after a restart those
    sequences run again and the result is what an uninterrupted run gives.
    """
    step = engine.checkpoint_job(name)
    if step is not None:
        log.info("checkpointed job %s at step %d for shutdown", name, step)
    return step
