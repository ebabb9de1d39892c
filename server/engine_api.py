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
    """What the server calls, always from its one engine thread.

    Errors: bad input raises ``ValueError`` naming the problem; an unknown request,
    adapter or job raises ``KeyError`` (``add_request`` with an unknown adapter raises
    ``ValueError``). Any exception from ``step`` is a device failure.
    """

    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    **slo_kwargs: Any) -> str:
        """Validates and queues a request; returns its id.

        Engines that schedule for latency targets also take ``slo`` (a
        ``coserve_jax.slo.SLO``) and ``arrival_time`` (``time.monotonic()`` clock); the
        server passes them only to engines whose signature has them
        (:func:`accepts_slo`). A refusal at admission raises ``AdmissionError``.
        """
        ...

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its pages; False if it is unknown (or finished)."""
        ...

    def step(self) -> list[RequestOutput]:
        """Runs one iteration (inference and finetuning); outputs of requests that advanced."""
        ...

    def has_unfinished(self) -> bool:
        """Requests or finetuning jobs still have work."""
        ...

    def kv_usage(self) -> KVUsage:
        """A snapshot of KV page usage."""
        ...

    def load_adapter(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Writes an adapter into a slot under ``adapter.name``."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Frees an adapter's slot (``KeyError`` if unknown, ``ValueError`` if in use)."""
        ...

    def adapters(self) -> list[str]:
        """Names in the adapter slots, finetuning jobs' adapters included."""
        ...

    def submit_job(self, job: FinetuneJob) -> JobProgress:
        """Starts a finetuning job, resuming from its checkpoint directory if one is there."""
        ...

    def job_progress(self, name: str) -> JobProgress:
        """A snapshot of a job."""
        ...

    def cancel_job(self, name: str) -> None:
        """Stops a running job (a no-op for a finished one)."""
        ...

    def trained_adapter(self, name: str) -> LoraAdapter:
        """A job's adapter with the weights of its latest optimizer step."""
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
