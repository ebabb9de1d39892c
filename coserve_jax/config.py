"""Model configuration read from a Hugging Face ``config.json``.

Only what the model honours is accepted. Anything else (another architecture,
an unknown RoPE type, sliding-window attention, an activation other than SiLU)
is refused with a ``ValueError`` naming the offending field, so a checkpoint
never silently runs with the wrong math.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters."""

    theta: float
    """Base of the rotary frequencies (``rope_theta``)."""
    rope_type: str = "default"
    """``default``, ``linear`` or ``llama3``."""
    factor: float = 1.0
    """Scaling factor (``linear`` and ``llama3``)."""
    low_freq_factor: float = 1.0
    """``llama3`` only: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """``llama3`` only: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """``llama3`` only: the context length the model was pretrained with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shapes and numerics of a Llama- or Qwen2-family decoder."""

    model_type: str
    """``llama`` or ``qwen2``."""
    vocab_size: int
    """Rows of the embedding table and columns of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Decoder layers; their weights are stacked on a leading axis."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int
    """Width of one attention head."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope: RopeConfig
    """Rotary embedding parameters."""
    max_position_embeddings: int
    """Longest sequence the model supports."""
    tie_word_embeddings: bool
    """The LM head is the transposed embedding table."""
    qkv_bias: bool
    """q/k/v projections carry a bias (always for Qwen2; ``attention_bias`` for Llama)."""
    o_bias: bool
    """o_proj carries a bias (Llama with ``attention_bias``)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a generation unless a request ignores them."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from the parsed ``config.json`` of a Hugging Face model."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"config field 'model_type' is {model_type!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        archs = d.get("architectures")
        if archs and SUPPORTED_ARCHITECTURES[model_type] not in archs:
            raise ValueError(
                f"config field 'architectures' is {archs}; expected "
                f"{SUPPORTED_ARCHITECTURES[model_type]!r} for model_type {model_type!r}"
            )
        _require(d, "hidden_act", "silu", lambda v: v in ("silu", "swish"))
        if d.get("use_sliding_window"):
            raise ValueError("config field 'use_sliding_window' is true; sliding-window "
                             "attention is not supported")
        if model_type == "llama" and d.get("sliding_window"):
            raise ValueError("config field 'sliding_window' is set; not supported for llama")
        if d.get("mlp_bias"):
            raise ValueError("config field 'mlp_bias' is true; MLP biases are not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("config field 'pretraining_tp' must be 1")

        num_heads = _positive_int(d, "num_attention_heads")
        hidden = _positive_int(d, "hidden_size")
        num_kv = d.get("num_key_value_heads") or num_heads
        if num_heads % num_kv:
            raise ValueError(
                f"config field 'num_key_value_heads' ({num_kv}) must divide "
                f"'num_attention_heads' ({num_heads})"
            )
        head_dim = d.get("head_dim") or hidden // num_heads
        if model_type == "llama":
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        else:
            qkv_bias, o_bias = True, False
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=_positive_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(d, "intermediate_size"),
            num_layers=_positive_int(d, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d),
            max_position_embeddings=_positive_int(d, "max_position_embeddings"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads ``config.json`` from a model directory."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older
    # checkpoints have `rope_theta` at the top level and an optional `rope_scaling`.
    params = d.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = d.get("rope_scaling") or {}
        field = "rope_scaling"
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config field '{field}.rope_type' is {rope_type!r}; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config field '{field}.partial_rotary_factor' must be 1.0")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    factor = float(params.get("factor", 1.0))
    if not factor > 0:
        raise ValueError(f"config field '{field}.factor' must be positive, got {factor}")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=factor)
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _positive_int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config field '{key}' must be a positive integer, got {value!r}")
    return value


def _require(d: dict[str, Any], key: str, default: Any, ok) -> None:
    value = d.get(key, default)
    if not ok(value):
        raise ValueError(f"config field '{key}' is {value!r}; not supported")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> list[float]:
    """Inverse frequencies of the rotary embedding, as Hugging Face computes them."""
    inv = [1.0 / rope.theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if rope.rope_type == "linear":
        return [f / rope.factor for f in inv]
    if rope.rope_type != "llama3":
        return inv
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rope.factor)
        else:
            smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            out.append((1 - smooth) * f / rope.factor + smooth * f)
    return out
