"""Reading and writing LoRA adapters in the Hugging Face PEFT directory format.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with one ``lora_A.weight [r, in]`` and one ``lora_B.weight [out, r]`` per layer and
target projection, under keys such as
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. Our layout is the
transpose, stacked over layers (see :class:`~coserve_jax.lora.adapter.LoraAdapter`).

Only plain LoRA on the seven decoder projections, every layer, is accepted. Anything
that would change the math (DoRA, biases, per-module ranks, modules_to_save, a subset
of layers, ...) is refused with a ``ValueError`` naming the problem, so an adapter never
silently serves with the wrong update. Pickled ``adapter_model.bin`` files are never read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from coserve_jax.config import ModelConfig
from coserve_jax.errors import InvalidRequest
from coserve_jax.lora.adapter import LoraAdapter, module_shape
from coserve_jax.lora.config import ALL_TARGETS, LoraConfig
from coserve_jax.model import Model
from coserve_jax.models.llama import ATTENTION_PROJECTIONS

__all__ = ["load_adapter", "peft_config_dict", "save_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\."
    r"(?P<module>\w+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
)

# Config fields that must be unset (None, false, empty) because they change the math
# or the set of weights; value: what the feature is, for the error message.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "rank_pattern": "rank_pattern (per-module ranks)",
    "alpha_pattern": "alpha_pattern (per-module alphas)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights)",
    "layers_pattern": "layers_pattern (adapting a subset of layers)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "exclude_modules": "exclude_modules",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
# init_lora_weights values whose adapters expect modified base weights.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def load_adapter(
    model: Model | ModelConfig,
    path: str | os.PathLike,
    name: str | None = None,
    max_rank: int | None = None,
) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory for ``model``; float32 weights on the host.

    ``name`` defaults to the directory's basename. ``max_rank``, when given, is the
    largest ``r`` accepted. Raises ``ValueError`` naming the problem for anything
    that is not plain LoRA on this model's projections, and ``FileNotFoundError``
    when the directory has no adapter.
    """
    cfg = model.config if isinstance(model, Model) else model
    path = os.fspath(path)
    name = name if name is not None else os.path.basename(os.path.normpath(path))
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, PICKLE_FILE)):
            raise InvalidRequest(f"{path} has only {PICKLE_FILE}; pickle files are never read "
                             f"(re-save the adapter with safe_serialization=True)")
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    with open(config_path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{config_path} is not a JSON object")
    config = _lora_config(raw, cfg, max_rank)
    a, b = _read_weights(weights_path, cfg, config)
    base = raw.get("base_model_name_or_path") or ""
    adapter = LoraAdapter(name, config, a, b, base_model_name_or_path=str(base))
    adapter.check_matches(cfg)
    return adapter


def save_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> None:
    """Writes ``adapter`` as a PEFT directory (``adapter_config.json`` + safetensors).

    PEFT's ``PeftModel.from_pretrained`` and vLLM read the result. The directory is
    written under a temporary name next to ``path`` and renamed into place, so a crash
    leaves either the old directory (or none) or the complete new one. An existing
    ``path`` is replaced only if it is empty or holds an ``adapter_config.json``.
    """
    path = os.path.abspath(os.fspath(path))
    tensors = _peft_tensors(adapter)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise FileExistsError(f"{path} exists and is not a plain directory")
        if os.listdir(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise FileExistsError(f"{path} exists and is not an adapter directory "
                                  f"(no {CONFIG_FILE}); refusing to replace it")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(peft_config_dict(adapter), f, indent=2, sort_keys=True)
            f.write("\n")
        for file in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync(os.path.join(tmp, file))
        _fsync(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(path, os.path.join(old, base))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def peft_config_dict(adapter: LoraAdapter) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT writes for a plain LoRA adapter."""
    c = adapter.config
    alpha = int(c.lora_alpha) if float(c.lora_alpha).is_integer() else c.lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model_name_or_path or None,
        "revision": None,
        "inference_mode": True,
        "r": c.r,
        "lora_alpha": alpha,
        "lora_dropout": c.lora_dropout,
        "target_modules": list(c.target_modules),
        "use_rslora": c.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _lora_config(raw: dict[str, Any], cfg: ModelConfig, max_rank: int | None) -> LoraConfig:
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise InvalidRequest(f"adapter peft_type is {peft_type!r}; only 'LORA' is supported")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if raw.get(field):
            raise InvalidRequest(f"adapter uses {what}: {field} = {raw[field]!r}; not supported")
    if raw.get("bias", "none") != "none":
        raise InvalidRequest(f"adapter bias is {raw['bias']!r}; only 'none' is supported")
    if raw.get("layers_to_transform") not in (None, []):
        raise InvalidRequest(f"adapter sets layers_to_transform = {raw['layers_to_transform']!r}; "
                         "adapting a subset of layers is not supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InvalidRequest(f"adapter has init_lora_weights = {init!r}, which modifies the base "
                         "weights; convert it to plain LoRA first (PEFT's "
                         "path_initial_model_for_weight_conversion)")
    r = raw.get("r", 8)
    if max_rank is not None and isinstance(r, int) and r > max_rank:
        raise InvalidRequest(f"adapter rank r = {r} is above max_rank = {max_rank}")
    try:
        return LoraConfig(
            r=r,
            lora_alpha=float(raw.get("lora_alpha", 8)),
            lora_dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=_target_modules(raw.get("target_modules"), cfg.num_layers),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"invalid adapter config: {e}") from e


def _target_modules(value: Any, num_layers: int) -> tuple[str, ...]:
    """Resolves PEFT ``target_modules`` (list, regex string or 'all-linear') to projections.

    Each entry is matched as PEFT matches it (a list entry by name or dotted suffix, a
    string as a full-match regex) against the module names of a Llama/Qwen2 causal LM;
    the result must be whole projections in every layer and nothing else.
    """
    if value is None or (not isinstance(value, str) and not value):
        raise InvalidRequest("adapter has no target_modules")
    names = _module_names(num_layers)
    if isinstance(value, str):
        if value.lower() == "all-linear":
            return ALL_TARGETS
        try:
            regex = re.compile(value)
        except re.error as e:
            raise InvalidRequest(f"target_modules regex {value!r} is invalid: {e}") from e
        matched = {n for n in names if regex.fullmatch(n)}
        if not matched:
            raise InvalidRequest(f"target_modules regex {value!r} matches no projection")
    elif isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        matched = set()
        for t in value:
            hits = {n for n in names if n == t or n.endswith("." + t)}
            if not hits:
                raise InvalidRequest(f"target module {t!r} is not supported; supported: "
                                 f"{list(ALL_TARGETS)}")
            matched |= hits
    else:
        raise InvalidRequest(f"target_modules must be a list of names or a string, got {value!r}")
    others = sorted(n for n in matched if names[n] is None)
    if others:
        raise InvalidRequest(f"target_modules {value!r} selects {others[:4]}; only the "
                         f"projections {list(ALL_TARGETS)} are supported")
    targets = []
    for module in ALL_TARGETS:
        count = sum(1 for n in matched if names[n] == module)
        if 0 < count < num_layers:
            raise InvalidRequest(f"target_modules {value!r} selects {module} in only {count} of "
                             f"{num_layers} layers; adapting a subset of layers is not supported")
        if count:
            targets.append(module)
    return tuple(targets)


def _module_names(num_layers: int) -> dict[str, str | None]:
    """Module names of a Llama/Qwen2 causal LM -> the projection they are, or None."""
    names: dict[str, str | None] = dict.fromkeys(
        ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb",
         "lm_head"))
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        for sub in ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm",
                    ".post_attention_layernorm"):
            names[layer + sub] = None
        for m in ALL_TARGETS:
            names[f"{layer}.{_parent(m)}.{m}"] = m
    return names


def _parent(module: str) -> str:
    return "self_attn" if module in ATTENTION_PROJECTIONS else "mlp"


def _read_weights(
    weights_path: str, cfg: ModelConfig, config: LoraConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reads and checks every tensor; returns stacked A ``[L, in, r]`` and B ``[L, r, out]``."""
    n, r = cfg.num_layers, config.r
    a = {m: np.zeros((n, *reversed(_a_shape(cfg, m, r))), np.float32)
         for m in config.target_modules}
    b = {m: np.zeros((n, *reversed(_b_shape(cfg, m, r))), np.float32)
         for m in config.target_modules}
    seen: set[tuple[int, str, str]] = set()
    adapter_names: set[str] = set()
    with safe_open(weights_path, framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            match = _KEY.fullmatch(key)
            layer = int(match["layer"]) if match else -1
            module = match["module"] if match else ""
            if (not match or module not in config.target_modules or layer >= n
                    or match["parent"] != _parent(module)):
                raise InvalidRequest(f"unexpected tensor {key!r} in {weights_path} (targets: "
                                 f"{list(config.target_modules)}, {n} layers)")
            if match["adapter"] is not None:
                adapter_names.add(match["adapter"])
                if len(adapter_names) > 1:
                    raise InvalidRequest(f"{weights_path} holds several adapters: "
                                     f"{sorted(adapter_names)}")
            slot = (layer, module, match["ab"])
            if slot in seen:
                raise InvalidRequest(f"tensor {key!r} appears twice in {weights_path}")
            seen.add(slot)
            t = f.get_tensor(key)
            want = (_a_shape if match["ab"] == "A" else _b_shape)(cfg, module, r)
            if t.shape != want:
                raise InvalidRequest(f"tensor {key!r} has shape {t.shape}; r = {r} and the model "
                                 f"need {want}")
            t = t.astype(np.float32)
            if not np.isfinite(t).all():
                raise InvalidRequest(f"tensor {key!r} has non-finite values")
            (a if match["ab"] == "A" else b)[module][layer] = t.T
    missing = [f"layers.{i}.{_parent(m)}.{m}.lora_{ab}" for m in config.target_modules
               for i in range(n) for ab in "AB" if (i, m, ab) not in seen]
    if missing:
        raise InvalidRequest(f"{weights_path} is missing {len(missing)} tensors, e.g. "
                         f"{missing[:3]}")
    return a, b


def _a_shape(cfg: ModelConfig, module: str, r: int) -> tuple[int, int]:
    return r, module_shape(cfg, module)[0]  # PEFT lora_A.weight [r, in]


def _b_shape(cfg: ModelConfig, module: str, r: int) -> tuple[int, int]:
    return module_shape(cfg, module)[1], r  # PEFT lora_B.weight [out, r]


def _peft_tensors(adapter: LoraAdapter) -> dict[str, np.ndarray]:
    """PEFT's state dict of an adapter: contiguous float32 tensors in torch layout."""
    r = adapter.config.r
    extra = (set(adapter.a) | set(adapter.b)) - set(adapter.config.target_modules)
    if extra:
        raise InvalidRequest(f"adapter {adapter.name!r} has weights for {sorted(extra)}, which "
                         "are not in its target_modules")
    out = {}
    num_layers = None
    for m in adapter.config.target_modules:
        if m not in adapter.a or m not in adapter.b:
            raise InvalidRequest(f"adapter {adapter.name!r} has no weights for {m}")
        a, b = np.asarray(adapter.a[m]), np.asarray(adapter.b[m])
        if (a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != r
                or b.shape[1] != r or (num_layers is not None and a.shape[0] != num_layers)):
            raise InvalidRequest(f"adapter {adapter.name!r} {m}: A {a.shape} / B {b.shape} are not "
                             f"[L, in, {r}] / [L, {r}, out] for one L")
        num_layers = a.shape[0]
        prefix = f"base_model.model.model.layers.{{}}.{_parent(m)}.{m}"
        for i in range(num_layers):
            out[prefix.format(i) + ".lora_A.weight"] = np.ascontiguousarray(a[i].T, np.float32)
            out[prefix.format(i) + ".lora_B.weight"] = np.ascontiguousarray(b[i].T, np.float32)
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

