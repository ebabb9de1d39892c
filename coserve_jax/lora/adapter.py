"""A LoRA adapter's weights, in this project's layout."""

from __future__ import annotations

import dataclasses

import numpy as np

from coserve_jax.config import ModelConfig
from coserve_jax.errors import InvalidRequest
from coserve_jax.lora.config import LoraConfig


def module_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (d, cfg.q_size), "k_proj": (d, cfg.kv_size), "v_proj": (d, cfg.kv_size),
        "o_proj": (cfg.q_size, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }[module]


@dataclasses.dataclass
class LoraAdapter:
    """Weights of one adapter: for each target module, A ``[L, in, r]`` and B ``[L, r, out]``.

    The update of a projection is ``x @ A @ B * config.scale`` (the transposes of
    PEFT's ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``).
    """

    name: str
    config: LoraConfig
    a: dict[str, np.ndarray]  # module -> [L, in, r] float32
    b: dict[str, np.ndarray]  # module -> [L, r, out] float32
    base_model_name_or_path: str = ""

    def check_matches(self, cfg: ModelConfig) -> None:
        """Raises ``ValueError`` if the shapes do not fit the model."""
        r = self.config.r
        for m in self.config.target_modules:
            if m not in self.a or m not in self.b:
                raise InvalidRequest(f"adapter {self.name!r} has no weights for {m}")
            fan_in, fan_out = module_shape(cfg, m)
            want_a, want_b = (cfg.num_layers, fan_in, r), (cfg.num_layers, r, fan_out)
            if self.a[m].shape != want_a or self.b[m].shape != want_b:
                raise InvalidRequest(
                    f"adapter {self.name!r} {m}: A {self.a[m].shape} / B {self.b[m].shape}, "
                    f"the model needs {want_a} / {want_b}")

    @classmethod
    def zeros_b(cls, name: str, config: LoraConfig, cfg: ModelConfig, seed: int) -> LoraAdapter:
        """A fresh trainable adapter as PEFT initialises one: A Kaiming-uniform, B zero."""
        rng = np.random.default_rng(seed)
        a, b = {}, {}
        for m in config.target_modules:
            fan_in, fan_out = module_shape(cfg, m)
            bound = 1.0 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            a[m] = rng.uniform(-bound, bound, (cfg.num_layers, fan_in, config.r)).astype(
                np.float32)
            b[m] = np.zeros((cfg.num_layers, config.r, fan_out), np.float32)
        return cls(name, config, a, b)
