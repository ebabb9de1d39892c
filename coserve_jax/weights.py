"""Reading Hugging Face safetensors checkpoints into the stacked parameter pytree.

Only safetensors are read, never pickles. Each stacked leaf is assembled on the
host one layer at a time in the target dtype, moved to the device, and dropped
before the next leaf is read, so host memory never holds a second full copy of
the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from coserve_jax.config import ModelConfig
from coserve_jax.models.llama import LayerParams, Params

# Stacked LayerParams field -> (Hugging Face name inside layer i, transpose?)
_LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", False),
    "post_norm": ("post_attention_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
}
_BIAS_FIELDS = {"q_bias": "qkv_bias", "k_bias": "qkv_bias", "v_bias": "qkv_bias",
                "o_bias": "o_bias"}


def resolve_dtype(dtype) -> jnp.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` or a dtype -> a jnp dtype."""
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return jnp.dtype(names[dtype])
    return jnp.dtype(dtype)


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """Maps every tensor name of a checkpoint directory to the file that holds it."""
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path} (pickled checkpoints "
                                "are not read)")
    out = {}
    for file in files:
        full = os.path.join(path, file)
        with safe_open(full, framework="numpy") as f:
            out |= dict.fromkeys(f.keys(), full)
    return out


def load_params(
    cfg: ModelConfig, path: str | os.PathLike, dtype="float32", progress: bool = True,
    place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None,
) -> Params:
    """Loads a checkpoint directory into a ``Params`` pytree on the default device.

    ``place(field_path, host_array)`` puts each stacked leaf on the devices instead
    (``sharding.layout.Layout.place_leaf``: each device receives only its shard)."""
    dtype = resolve_dtype(dtype)
    np_dtype = np.dtype(dtype)
    where = checkpoint_files(path)
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(name: str) -> np.ndarray:
            if name not in where:
                raise KeyError(f"checkpoint {path} has no tensor {name!r}")
            file = where[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            return handles[file].get_tensor(name)

        def to_device(a: np.ndarray, *field: str) -> jax.Array:
            a = a.astype(np_dtype, copy=False)
            return jax.device_put(a) if place is None else place(field, a)

        fields = [f for f in _LAYER_TENSORS if f not in _BIAS_FIELDS
                  or getattr(cfg, _BIAS_FIELDS[f])]
        layers = {}
        for field in _progress(fields, progress, "loading weights"):
            hf_name, transpose = _LAYER_TENSORS[field]
            stacked = None
            for i, t in enumerate(_layer_tensors(read, cfg.num_layers, hf_name, transpose)):
                if stacked is None:
                    stacked = np.empty((cfg.num_layers, *t.shape), np_dtype)
                stacked[i] = t
            layers[field] = to_device(stacked, "layers", field)
            del stacked
        embed = to_device(read("model.embed_tokens.weight"), "embed")
        _check_shape("model.embed_tokens.weight", embed.shape, (cfg.vocab_size, cfg.hidden_size))
        head = None
        if not cfg.tie_word_embeddings:
            head = to_device(read("lm_head.weight").T, "lm_head")
        params = Params(embed=embed, layers=LayerParams(**layers),
                        final_norm=to_device(read("model.norm.weight"), "final_norm"),
                        lm_head=head)
    _check_layer_shapes(cfg, params.layers)
    return params


def _layer_tensors(read, num_layers: int, hf_name: str, transpose: bool) -> Iterator[np.ndarray]:
    for i in range(num_layers):
        t = read(f"model.layers.{i}.{hf_name}")
        yield t.T if transpose else t


def _check_shape(name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"tensor {name} has shape {tuple(got)}; config implies {tuple(want)}")


def _check_layer_shapes(cfg: ModelConfig, lp: LayerParams) -> None:
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    want = {"q_proj": (n, d, cfg.q_size), "k_proj": (n, d, cfg.kv_size),
            "v_proj": (n, d, cfg.kv_size), "o_proj": (n, cfg.q_size, d),
            "gate_proj": (n, d, f), "up_proj": (n, d, f), "down_proj": (n, f, d)}
    for field, shape in want.items():
        _check_shape(f"layers.{field}", getattr(lp, field).shape, shape)


def _progress(items, enabled: bool, desc: str):
    return tqdm(items, desc=desc, leave=False) if enabled else items
