"""coserve-jax: LLM inference and LoRA finetuning co-served in one jitted JAX step."""

from coserve_jax.api import generate
from coserve_jax.config import ModelConfig
from coserve_jax.engine import Engine, EngineConfig, RequestOutput
from coserve_jax.model import Model, forward_logits, load_model
from coserve_jax.sampling import SamplingParams
from coserve_jax.tiny_model import tiny_model_dir

__all__ = [
    "Engine",
    "EngineConfig",
    "Model",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "forward_logits",
    "generate",
    "load_model",
    "tiny_model_dir",
]
