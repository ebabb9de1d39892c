"""PEFT-format adapter I/O, checked against the real PEFT library (CPU, float32)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from coserve_jax.lora import peft_io
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import ALL_TARGETS, LoraConfig
from coserve_jax.lora.peft_io import load_adapter, save_adapter
from coserve_jax.model import load_model

TOKENS = [[5, 17, 42, 99, 250, 3, 7], [1, 2, 3, 4, 5, 6, 299]]
PREFIX = "base_model.model.model.layers"

# name -> PEFT LoraConfig kwargs of the test adapters (random weights, not trained)
ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=list(ALL_TARGETS)),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["v_proj", "down_proj", "q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    path = str(tmp_path_factory.mktemp("base"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def hf_base(base_dir: str):
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


@pytest.fixture(scope="module")
def model(base_dir):
    return load_model(base_dir, progress=False)


@pytest.fixture(scope="module")
def peft_adapters(base_dir, tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (PEFT-saved adapter dir with random non-zero B, PEFT logits)."""
    out = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        pm = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(lora_dropout=0.0, **kwargs))
        with torch.no_grad():
            for mod in pm.modules():
                if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                    mod.lora_B["default"].weight.normal_(0.0, 0.1)
        path = str(tmp_path_factory.mktemp("adapters") / name)
        pm.save_pretrained(path)
        out[name] = (path, logits_of(pm.eval()))
    return out


def peft_load(base_dir: str, path: str):
    """PeftModel.from_pretrained, failing on any warning about missing/unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_base(base_dir), path).eval()
    bad = [str(w.message) for w in caught
           if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return pm


def peft_weights(path: str) -> dict[str, np.ndarray]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_load_matches_peft_tensors(model, peft_adapters, name):
    path, _ = peft_adapters[name]
    kwargs = ADAPTERS[name]
    adapter = load_adapter(model, path)
    assert adapter.name == name
    want = LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], lora_dropout=0.0,
                      target_modules=tuple(kwargs["target_modules"]),
                      use_rslora=kwargs.get("use_rslora", False))
    assert adapter.config == want
    r, alpha = kwargs["r"], kwargs["lora_alpha"]
    assert adapter.config.scale == pytest.approx(alpha / (r**0.5 if name == "rslora" else r))
    tensors = peft_weights(path)
    assert len(tensors) == 2 * 2 * len(want.target_modules)
    for m in want.target_modules:
        parent = "self_attn" if m in ALL_TARGETS[:4] else "mlp"
        for i in range(2):
            key = f"{PREFIX}.{i}.{parent}.{m}"
            np.testing.assert_array_equal(adapter.a[m][i], tensors[key + ".lora_A.weight"].T)
            np.testing.assert_array_equal(adapter.b[m][i], tensors[key + ".lora_B.weight"].T)
        assert adapter.a[m].dtype == adapter.b[m].dtype == np.float32
        assert np.abs(adapter.b[m]).min() > 0


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_round_trip_through_peft(model, base_dir, peft_adapters, tmp_path, name):
    path, want_logits = peft_adapters[name]
    adapter = load_adapter(model, path)
    out = str(tmp_path / "saved")
    save_adapter(adapter, out)
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary leftovers
    theirs, ours = peft_weights(path), peft_weights(out)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    pm = peft_load(base_dir, out)
    cfg = pm.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (
        adapter.config.r, adapter.config.lora_alpha, adapter.config.use_rslora)
    torch.testing.assert_close(logits_of(pm), want_logits, rtol=0, atol=1e-6)
    again = load_adapter(model, out, name="again")
    assert again.name == "again" and again.config == adapter.config
    for m in adapter.config.target_modules:
        np.testing.assert_array_equal(again.a[m], adapter.a[m])
        np.testing.assert_array_equal(again.b[m], adapter.b[m])


def test_zeros_b_adapter_saved_loads_in_peft(model, base_dir, tmp_path):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=("k_proj", "o_proj", "up_proj"))
    adapter = LoraAdapter.zeros_b("fresh", config, model.config, seed=3)
    rng = np.random.default_rng(4)
    for m in adapter.b:
        adapter.b[m] = rng.normal(0, 0.1, adapter.b[m].shape).astype(np.float32)
    out = str(tmp_path / "fresh")
    save_adapter(adapter, out)
    pm = peft_load(base_dir, out)
    state = pm.state_dict()
    merged = hf_base(base_dir)
    with torch.no_grad():
        for m in config.target_modules:
            parent = "self_attn" if m in ALL_TARGETS[:4] else "mlp"
            for i in range(model.config.num_layers):
                key = f"{PREFIX}.{i}.{parent}.{m}"
                np.testing.assert_array_equal(
                    state[key + ".lora_A.default.weight"].numpy(), adapter.a[m][i].T)
                np.testing.assert_array_equal(
                    state[key + ".lora_B.default.weight"].numpy(), adapter.b[m][i].T)
                delta = (adapter.a[m][i] @ adapter.b[m][i]).T * config.scale
                getattr(getattr(merged.model.layers[i], parent), m).weight += torch.from_numpy(
                    delta)
    got, base = logits_of(pm), logits_of(hf_base(base_dir))
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, logits_of(merged), rtol=1e-5, atol=1e-5)


def variant(src: str, dst, config: dict | None = None, edit=None) -> str:
    """A copy of adapter dir ``src`` with config fields replaced and tensors edited."""
    dst = str(dst)
    shutil.copytree(src, dst)
    if config:
        cfg_path = os.path.join(dst, "adapter_config.json")
        with open(cfg_path) as f:
            raw = json.load(f) | config
        with open(cfg_path, "w") as f:
            json.dump(raw, f)
    if edit:
        weights = os.path.join(dst, "adapter_model.safetensors")
        tensors = load_file(weights)
        edit(tensors)
        save_file(tensors, weights)
    return dst


def _q_a(layer: int) -> str:
    return f"{PREFIX}.{layer}.self_attn.q_proj.lora_A.weight"


def _rename_default(tensors):
    for k in list(tensors):
        tensors[k.replace(".weight", ".default.weight")] = tensors.pop(k)


@pytest.mark.parametrize("config, edit", [
    ({"target_modules": ["down_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                         "up_proj", "q_proj"]}, None),
    ({"target_modules": "all-linear"}, None),
    ({"target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"}, None),
    ({"target_modules": ["self_attn.q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj",
                         "up_proj", "down_proj"], "layers_to_transform": []}, None),
    (None, _rename_default),
])
def test_accepted_variants(model, peft_adapters, tmp_path, config, edit):
    path = variant(peft_adapters["plain"][0], tmp_path / "v", config, edit)
    adapter = load_adapter(model, path)
    want = load_adapter(model, peft_adapters["plain"][0])
    assert adapter.config == want.config
    for m in ALL_TARGETS:
        np.testing.assert_array_equal(adapter.a[m], want.a[m])
        np.testing.assert_array_equal(adapter.b[m], want.b[m])


@pytest.mark.parametrize("config, match", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"layers_to_transform": [0, 1]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"init_lora_weights": "pissa"}, "modifies the base weights"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": ["q_proj", "c_attn"]}, "c_attn"),
    ({"target_modules": r".*\.layers\.0\..*_proj"}, "only 1 of 2 layers"),
    ({"target_modules": ".*"}, "only the projections"),
    ({"target_modules": "q_proj"}, "matches no projection"),
    ({"target_modules": ["q_proj"]}, "unexpected tensor"),
    ({"r": 4}, "shape"),
])
def test_refused_configs(model, peft_adapters, tmp_path, config, match):
    path = variant(peft_adapters["plain"][0], tmp_path / "v", config)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(_q_a(1)), r"missing 1 tensors.*layers\.1\.self_attn\.q_proj\.lora_A"),
    (lambda t: t.update({_q_a(1): t[_q_a(1)][:4]}), r"q_proj\.lora_A\.weight' has shape"),
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[_q_a(0)]}), "unexpected"),
    (lambda t: t.update({f"{PREFIX}.2.self_attn.q_proj.lora_A.weight": t[_q_a(0)]}),
     "unexpected"),
    (lambda t: t.update({_q_a(0): np.full_like(t[_q_a(0)], np.nan)}), "non-finite"),
])
def test_refused_tensors(model, peft_adapters, tmp_path, edit, match):
    path = variant(peft_adapters["plain"][0], tmp_path / "v", edit=edit)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)


def test_refuses_rank_above_max_and_pickles(model, peft_adapters, tmp_path):
    src = peft_adapters["plain"][0]
    with pytest.raises(ValueError, match="max_rank"):
        load_adapter(model, src, max_rank=4)
    assert load_adapter(model, src, max_rank=8).config.r == 8
    path = variant(src, tmp_path / "bin")
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        f.write(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(model, path)
    with pytest.raises(FileNotFoundError):
        load_adapter(model, tmp_path / "nowhere")


def test_save_replaces_atomically(model, peft_adapters, tmp_path, monkeypatch):
    plain = load_adapter(model, peft_adapters["plain"][0])
    rs = load_adapter(model, peft_adapters["rslora"][0])
    out = tmp_path / "out"
    save_adapter(plain, out)
    save_adapter(rs, out)  # replaces an existing adapter
    assert load_adapter(model, out).config == rs.config
    assert sorted(os.listdir(tmp_path)) == ["out"]

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft_io, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(plain, out)
    assert load_adapter(model, out).config == rs.config  # old adapter intact
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()

    other = tmp_path / "not_an_adapter"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        save_adapter(plain, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_saved_config_is_complete(model, peft_adapters, tmp_path):
    adapter = load_adapter(model, peft_adapters["rslora"][0])
    adapter.base_model_name_or_path = "meta-llama/Llama-3.2-1B"
    save_adapter(adapter, tmp_path / "a")
    with open(tmp_path / "a" / "adapter_config.json") as f:
        raw = json.load(f)
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM"
    assert raw["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert (raw["r"], raw["lora_alpha"], raw["use_rslora"]) == (4, 8, True)
    assert raw["bias"] == "none" and raw["use_dora"] is False and raw["modules_to_save"] is None
    assert raw["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert isinstance(cfg, peft.LoraConfig) and cfg.task_type == "CAUSAL_LM"
    assert load_adapter(model, tmp_path / "a").base_model_name_or_path == raw[
        "base_model_name_or_path"]
