"""Tiny random-weight Hugging Face checkpoints, built with transformers, for parity tests.

Three styles cover what the loader and the decoder must honour:

- ``llama31``: Llama 3.1 shapes. llama3 RoPE scaling whose
  ``original_max_position_embeddings`` (256) is below ``max_position_embeddings``
  (1024), so the scaling really rewrites the low frequencies; rope_theta 500000;
  GQA 4:1 (8 query heads, 2 KV heads); an untied LM head.
- ``llama32``: Llama 3.2 shapes. Tied embeddings and an explicit ``head_dim`` of 64
  while ``hidden_size / num_attention_heads`` would be 32 (so ``q_size`` differs
  from ``hidden_size``); GQA 2:1; llama3 RoPE scaling with factor 32 as 3.2 ships.
- ``qwen25``: Qwen2.5 shapes. q/k/v biases (non-zero), tied embeddings, GQA 2:1,
  default RoPE with theta 1e6.

Weight scale: transformers initialises linear and embedding weights with
``std=initializer_range``. The usual 0.02 gives logits spread over ~0.1, where the
top two candidates of a greedy step can sit within ~1e-6 of each other; float32
rounding differences between XLA and PyTorch then flip the argmax and a parity
test fails (or passes) by luck. We never loosen tolerances, so instead the models
use ``INITIALIZER_RANGE`` (0.2), which spreads the logits over several units and
keeps the top-1/top-2 margin far above float32 noise; the greedy test checks that
margin explicitly. RMSNorm weights (ones at init) and Qwen2's biases (zeros at
init) are also set to random values, so a loader that drops or misplaces them
cannot pass.

EOS ids: chosen so that every style's greedy continuations in the parity test
contain one of its EOS tokens, so generating with ``ignore_eos`` past an EOS is
really exercised (the test asserts it).
"""

from __future__ import annotations

import os

import torch

STYLES = ("llama31", "llama32", "qwen25")
INITIALIZER_RANGE = 0.2
SEEDS = {"llama31": 1031, "llama32": 1032, "qwen25": 1025}

_COMMON = {
    "vocab_size": 384,
    "num_hidden_layers": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "initializer_range": INITIALIZER_RANGE,
    "hidden_act": "silu",
}


def hf_config(style: str):
    """The transformers config object of a style."""
    from transformers import LlamaConfig, Qwen2Config

    if style == "llama31":
        return LlamaConfig(
            **_COMMON,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=3,
        )
    if style == "llama32":
        return LlamaConfig(
            **_COMMON,
            hidden_size=128,
            intermediate_size=320,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=[2, 3],
        )
    if style == "qwen25":
        return Qwen2Config(
            **_COMMON,
            hidden_size=96,
            intermediate_size=224,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=2,
        )
    raise ValueError(f"unknown style {style!r}; one of {STYLES}")


def build_hf_model(style: str):
    """A float32, eval-mode transformers model of a style with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEEDS[style])
    config = hf_config(style)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model.eval()


def save_hf_model(style: str, path: str | os.PathLike, **save_kwargs) -> str:
    """Builds the model of a style and ``save_pretrained``s it (safetensors) into ``path``."""
    path = os.fspath(path)
    build_hf_model(style).save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


def load_hf_model(path: str | os.PathLike):
    """The saved checkpoint back in transformers: float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.fspath(path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
