"""coserve-jax: LLM inference and LoRA finetuning co-served in one jitted JAX step."""

from coserve_jax.api import generate
from coserve_jax.config import ModelConfig
from coserve_jax.engine import Engine, EngineConfig, RequestOutput
from coserve_jax.engine_config import (
    AdapterSlotsConfig,
    BucketConfig,
    CacheConfig,
    FinetuneConfig,
    KernelConfig,
    SchedulingConfig,
    TelemetryConfig,
)
from coserve_jax.finetune.data import DataConfig, Dataset, from_records, load_jsonl
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.finetune.optim import OptimizerConfig
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import load_adapter, save_adapter
from coserve_jax.model import Model, forward_logits, load_model
from coserve_jax.sampling import SamplingParams
from coserve_jax.tiny_model import tiny_model_dir

__all__ = [
    "AdapterSlotsConfig",
    "BucketConfig",
    "CacheConfig",
    "DataConfig",
    "Dataset",
    "Engine",
    "EngineConfig",
    "FinetuneConfig",
    "FinetuneJob",
    "JobProgress",
    "KernelConfig",
    "LoraAdapter",
    "LoraConfig",
    "Model",
    "ModelConfig",
    "OptimizerConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulingConfig",
    "TelemetryConfig",
    "forward_logits",
    "from_records",
    "generate",
    "load_adapter",
    "load_jsonl",
    "load_model",
    "save_adapter",
    "tiny_model_dir",
]
