"""Request bodies of the OpenAI-compatible API, as pydantic models.

Field names, types and bounds follow OpenAI's API reference; a body that does not fit
is answered 422 naming the field (:func:`server.http.errors.validation_error`). Unknown
fields are ignored, as OpenAI and vLLM do. Our extensions ride along as extra body
fields, as vLLM's do: ``top_k``, ``ignore_eos``, ``stop_token_ids`` and ``slo`` on
inference; ``lora``, ``optimizer``, ``max_steps`` and ``max_seq_len`` on fine-tuning jobs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coserve_jax.sampling import MAX_LOGPROBS, MAX_SEED

MAX_N = 16
"""Choices per request at most (each is one engine request)."""
MAX_STOP_STRINGS = 4

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SloTargets(_Body):
    """Latency targets of one request (our extension; 0 = the engine's default)."""

    ttft_s: NonNegative = 0.0
    tpot_s: NonNegative = 0.0


class SamplingBody(_Body):
    """Fields that completions and chat completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names where vLLM has them).
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    slo: SloTargets | None = None


class CompletionRequest(SamplingBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class LoadLoraRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's shape); the path is under the adapter root."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


Auto = Literal["auto"]


class Hyperparameters(_Body):
    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"


class LoraSpec(_Body):
    """LoRA of a fine-tuning job (our extension; defaults as over gRPC)."""

    r: int = Field(0, ge=0)
    lora_alpha: float = Field(0.0, ge=0, allow_inf_nan=False)
    target_modules: list[str] | None = None
    use_rslora: bool = False


class OptimizerSpec(_Body):
    """Optimizer of a fine-tuning job (our extension; defaults as over gRPC)."""

    name: str = ""
    learning_rate: NonNegative = 0.0
    schedule: str = ""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: NonNegative = 0.0
    momentum: NonNegative = 0.0
    max_grad_norm: NonNegative | None = None


class SupervisedMethod(_Body):
    hyperparameters: Hyperparameters | None = None


class Method(_Body):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class FineTuningJobRequest(_Body):
    """``POST /v1/fine_tuning/jobs``."""

    training_file: str = Field(min_length=1)
    model: str = Field(min_length=1)
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, Any] | None = None
    # Extensions.
    lora: LoraSpec | None = None
    optimizer: OptimizerSpec | None = None
    max_steps: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=2)
    checkpoint_every: int | None = Field(None, ge=0)
