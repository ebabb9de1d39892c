"""A loaded model (config, frozen weights, tokenizer) and its plain reference forward."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from coserve_jax.config import ModelConfig
from coserve_jax.errors import InvalidRequest
from coserve_jax.models import llama
from coserve_jax.weights import load_params, resolve_dtype
from pallas_kernels.lora import lora_single_reference


@dataclasses.dataclass(eq=False)
class Model:
    """A decoder ready to serve: its config, stacked frozen weights and tokenizer."""

    config: ModelConfig
    params: llama.Params
    tokenizer: object | None
    path: str
    dtype: jnp.dtype

    def check_tokens(self, tokens, what: str = "prompt") -> list[int]:
        """Validates a list of token ids against the vocabulary; returns it as ints."""
        ids = list(tokens)
        if not ids:
            raise InvalidRequest(f"{what} is empty")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise InvalidRequest(f"{what} token at index {i} is {t!r}, not an integer id")
            if not 0 <= t < self.config.vocab_size:
                raise InvalidRequest(f"{what} token id {t} at index {i} is outside the "
                                 f"vocabulary [0, {self.config.vocab_size})")
        return [int(t) for t in ids]


def load_model(path: str | os.PathLike, dtype="float32", progress: bool = True,
               mesh=None) -> Model:
    """Loads a Hugging Face model directory (config.json, *.safetensors, tokenizer files).

    With a ``mesh`` (``sharding.make_mesh``) every weight is placed in its tensor-parallel
    layout as it is read, so no device ever holds the whole model."""
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    place = None
    if mesh is not None:
        from sharding.layout import Layout

        place = Layout(mesh, cfg).place_leaf
    params = load_params(cfg, path, dtype, progress=progress, place=place)
    return Model(config=cfg, params=params, tokenizer=_load_tokenizer(path), path=path,
                 dtype=resolve_dtype(dtype))


def _load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None  # a bare checkpoint serves token ids only
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def single_adapter_lora(scale) -> llama.LoraFn:
    """A ``LoraFn`` applying one adapter ``{module: (a, b)}`` (per layer) to every token."""

    def lora(la, module, x):
        if la is None or module not in la:
            return None
        return lora_single_reference(x, *la[module], scale)

    return lora


def adapter_weights(adapter) -> dict:
    """``{module: (A [L, in, r], B [L, r, out])}`` of a ``LoraAdapter``, as device arrays."""
    return {m: (jnp.asarray(adapter.a[m]), jnp.asarray(adapter.b[m]))
            for m in adapter.config.target_modules}


def forward_logits(model: Model, tokens, adapter=None) -> np.ndarray:
    """Float32 logits ``[batch, seq, vocab]`` of whole sequences, with no cache.

    The plain computation every fast path is held against. ``tokens`` is a
    rectangular ``[batch, seq]`` array-like (or one ``[seq]`` sequence);
    ``adapter`` is an optional ``LoraAdapter`` applied to every token.
    """
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, seq] with seq > 0, got shape {arr.shape}")
    for row in arr:
        model.check_tokens(row.tolist(), "tokens")
    weights, scale = None, 0.0
    if adapter is not None:
        adapter.check_matches(model.config)
        weights, scale = adapter_weights(adapter), adapter.config.scale
    from coserve_jax.programs import forward_dense

    return np.asarray(forward_dense(model.config, model.params, jnp.asarray(arr, jnp.int32),
                                         weights, jnp.float32(scale)))
