"""Parity of coserve_jax with transformers (PyTorch, CPU, float32, eager attention).

Three tiny checkpoint styles (see ``hf_models.py``): Llama 3.1, Llama 3.2 and
Qwen2.5 shapes. For each, the dense reference forward matches transformers'
logits, the engine's batched greedy generation matches transformers' greedy
``generate`` token for token, bfloat16 loading works, and sharded checkpoints
load the same. Config fields the model does not honour are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import coserve_jax
from coserve_jax.config import RopeConfig, rope_inv_freq

from hf_models import STYLES, hf_config, load_hf_model, save_hf_model

# Parity tolerance for float32 logits. Relative error of a logits tensor is
#     rel_err(ours, hf) = max|ours - hf| / max|hf|
# (one scalar over the whole [batch, seq, vocab] tensor).
LOGITS_RTOL = 1e-4
MAX_TOKENS = 32
VOCAB = hf_config("llama31").vocab_size


def rel_err(ours: np.ndarray, hf: np.ndarray) -> float:
    """max|ours - hf| / max|hf|, the relative error every parity check here uses."""
    ours, hf = np.asarray(ours, np.float64), np.asarray(hf, np.float64)
    assert ours.shape == hf.shape, (ours.shape, hf.shape)
    return float(np.max(np.abs(ours - hf)) / np.max(np.abs(hf)))


def random_tokens(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape, dtype=np.int64)


def hf_logits(model_hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model_hf(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module", params=STYLES)
def style(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(request, style) -> str:
    return request.getfixturevalue(f"{style}_dir")


@pytest.fixture(scope="module")
def ours(model_dir) -> coserve_jax.Model:
    return coserve_jax.load_model(model_dir, progress=False)


@pytest.fixture(scope="module")
def model_hf(model_dir):
    model = load_hf_model(model_dir)
    # Greedy parity runs with ignore_eos on our side, so transformers must not stop
    # at EOS either (a None eos in a passed GenerationConfig would be refilled from
    # this one, so it is cleared here).
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def seqs() -> np.ndarray:
    # Two sequences of 96 tokens: positions far enough for RoPE (and the llama3
    # scaling of the low frequencies) to matter.
    return random_tokens(7, 2, 96)


# ----- config ---------------------------------------------------------------------------------


def test_config_matches_hf(style, ours, model_hf):
    """The parsed config has the shapes transformers built (head_dim, GQA, ties, biases)."""
    cfg, hf = ours.config, model_hf.config
    assert cfg.model_type == hf.model_type
    assert cfg.num_heads == hf.num_attention_heads
    assert cfg.num_kv_heads == hf.num_key_value_heads < cfg.num_heads
    attn = model_hf.model.layers[0].self_attn
    assert cfg.head_dim == attn.head_dim
    assert cfg.q_size == attn.q_proj.out_features
    assert cfg.tie_word_embeddings == (style != "llama31")
    assert (ours.params.lm_head is None) == cfg.tie_word_embeddings
    assert cfg.qkv_bias == (style == "qwen25")
    if style == "llama32":
        assert cfg.head_dim == 64 and cfg.q_size != cfg.hidden_size
    if style == "qwen25":
        bias = attn.q_proj.bias.detach().numpy()
        assert np.abs(bias).min() > 0  # the fixture's biases are really non-zero
    assert ours.tokenizer is None  # a bare checkpoint: token ids only


def test_rope_inv_freq_matches_hf(style, ours, model_hf):
    """Our rotary inverse frequencies equal the ones transformers computed."""
    cfg = ours.config
    ref = model_hf.model.rotary_emb.inv_freq.numpy()
    got = np.asarray(rope_inv_freq(cfg.rope, cfg.head_dim), np.float32)
    # Float32 vs float64-then-rounded computation: a few ulps apart at most.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert model_hf.model.rotary_emb.attention_scaling == 1.0
    if cfg.rope.rope_type == "llama3":
        # The fixture is meaningful: scaling rewrites some frequencies, keeps others.
        plain = np.asarray(rope_inv_freq(RopeConfig(theta=cfg.rope.theta), cfg.head_dim))
        changed = ~np.isclose(got, plain, rtol=1e-6)
        assert changed.any() and not changed.all(), changed


# ----- logits ---------------------------------------------------------------------------------


def test_logits_match_hf(ours, model_hf, seqs):
    """float32 forward_logits vs transformers' logits: rel_err <= 1e-4."""
    got = coserve_jax.forward_logits(ours, seqs)
    ref = hf_logits(model_hf, seqs)
    assert got.dtype == np.float32 and got.shape == ref.shape == (2, 96, VOCAB)
    err = rel_err(got, ref)
    print(f"float32 logits rel_err={err:.3e}")
    assert err <= LOGITS_RTOL


def test_logits_of_single_sequence_match_batched(ours, seqs):
    """A [seq] input is one batch row; rows do not interact."""
    both = coserve_jax.forward_logits(ours, seqs)
    one = coserve_jax.forward_logits(ours, seqs[1])
    assert one.shape == (1, 96, VOCAB)
    assert rel_err(one[0], both[1]) <= LOGITS_RTOL


# ----- greedy generation ------------------------------------------------------------------------


def test_greedy_generation_matches_hf(ours, model_hf):
    """Three prompts batched in one engine call == transformers' greedy generate per prompt.

    Prompt lengths 7, 37 and 100 (144 tokens) exceed the 128-token step budget, so
    prefill is chunked and decodes run next to prefill chunks; they span 1 to 7 KV
    pages of 16 tokens.
    """
    prompts = [random_tokens(100 + i, n).tolist() for i, n in enumerate((7, 37, 100))]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = model_hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS,
                eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                output_logits=True,
            )
        new = out.sequences[0, len(prompt):].tolist()
        assert len(new) == MAX_TOKENS  # transformers did not stop early
        # Precondition, not a tolerance: at every greedy step transformers' top-1
        # logit leads the runner-up by more than twice the parity tolerance, so any
        # implementation within LOGITS_RTOL of it must pick the same token. The
        # fixture's weight scale (hf_models.INITIALIZER_RANGE) is what ensures it.
        for step, logits in enumerate(out.logits):
            row = logits[0].numpy()
            top2 = np.sort(row)[-2:]
            margin = top2[1] - top2[0]
            assert margin > 2 * LOGITS_RTOL * np.abs(row).max(), (
                f"near-tie in the reference at step {step} (margin {margin:.2e}); "
                "re-seed the fixture"
            )
        expected.append(new)

    # The continuations cross an EOS (see hf_models), so ignore_eos is exercised.
    eos = set(ours.config.eos_token_ids)
    assert eos and any(t in eos for new in expected for t in new)

    got = coserve_jax.generate(ours, prompts, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [len(g) for g in got] == [MAX_TOKENS] * len(prompts)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} (length {len(prompts[i])}) diverges"


# ----- bfloat16 ---------------------------------------------------------------------------------


def test_bfloat16_load(model_dir, ours, model_hf, seqs):
    """bfloat16 loads, and its logits stay as near the float32 ones as transformers' do.

    bfloat16 is not the parity target (float32 is), so this is a loose sanity check.
    The yardstick is transformers' own bfloat16 run of the same checkpoint, which on
    these models (large init scale, peaky attention) drifts 0.06-0.2 (rel_err) from
    its float32 logits; a broken load (wrong layout, dropped bias or norm) gives
    rel_err around 1 or more, far outside twice that drift.
    """
    model16 = coserve_jax.load_model(model_dir, dtype="bfloat16", progress=False)
    assert model16.config == ours.config
    assert model16.dtype == np.dtype("bfloat16")
    leaves = jax.tree.leaves(model16.params)
    assert leaves and all(x.dtype == np.dtype("bfloat16") for x in leaves)
    got = coserve_jax.forward_logits(model16, seqs)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    err = rel_err(got, coserve_jax.forward_logits(ours, seqs))

    hf16 = load_hf_model(model_dir).to(torch.bfloat16)
    hf_err = rel_err(hf_logits(hf16, seqs), hf_logits(model_hf, seqs))
    print(f"bfloat16 vs float32 logits rel_err: ours={err:.3e} transformers={hf_err:.3e}")
    assert err <= 2 * hf_err


# ----- sharded checkpoint -----------------------------------------------------------------------


def test_sharded_checkpoint(style, tmp_path, ours, model_hf, seqs):
    """A checkpoint saved in 50KB shards (with an index) loads to the same logits."""
    save_hf_model(style, tmp_path, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1
    sharded = coserve_jax.load_model(tmp_path, progress=False)
    assert sharded.config == ours.config
    got = coserve_jax.forward_logits(sharded, seqs)
    # Same weights through the same jitted function: bitwise the unsharded logits.
    np.testing.assert_array_equal(got, coserve_jax.forward_logits(ours, seqs))
    assert rel_err(got, hf_logits(model_hf, seqs)) <= LOGITS_RTOL


# ----- config refusal and parsing ----------------------------------------------------------------


def _copy_with_config(src: str, dst, edit) -> str:
    """A full copy of a checkpoint whose config.json is edited in place by ``edit(d)``."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)
    return os.fspath(dst)


def _set_sliding_window(d):
    d["use_sliding_window"] = True
    d["sliding_window"] = 64


def _yarn_rope_parameters(d):
    d["rope_parameters"] = {**d["rope_parameters"], "rope_type": "yarn", "factor": 4.0}


def _yarn_rope_scaling(d):
    # The older form: no rope_parameters, top-level rope_theta plus rope_scaling.
    params = d.pop("rope_parameters")
    d["rope_theta"] = params.pop("rope_theta")
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 256}


def _mistral(d):
    d["model_type"] = "mistral"
    d["architectures"] = ["MistralForCausalLM"]


def _gpt2(d):
    d["model_type"] = "gpt2"
    d["architectures"] = ["GPT2LMHeadModel"]


@pytest.mark.parametrize(
    ("src", "edit", "field"),
    [
        ("qwen25", _set_sliding_window, "use_sliding_window"),
        ("llama31", _yarn_rope_parameters, "rope_type"),
        ("llama31", _yarn_rope_scaling, "rope_type"),
        ("qwen25", _yarn_rope_scaling, "rope_type"),
        ("llama32", _mistral, "model_type"),
        ("llama31", _gpt2, "model_type"),
    ],
    ids=["qwen2-sliding-window", "rope_parameters-yarn", "rope_scaling-yarn",
         "qwen2-rope_scaling-yarn", "mistral", "gpt2"],
)
def test_load_refuses_unsupported_config(request, tmp_path, src, edit, field):
    path = _copy_with_config(request.getfixturevalue(f"{src}_dir"), tmp_path / "m", edit)
    with pytest.raises(ValueError, match=field):
        coserve_jax.load_model(path, progress=False)


def _to_legacy_rope(d: dict, key: str = "rope_type") -> dict:
    """The pre-transformers-5 form of a config: top-level rope_theta, rope_scaling."""
    d = dict(d)
    params = dict(d.pop("rope_parameters"))
    d["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    d["rope_scaling"] = None if rope_type == "default" else {key: rope_type, **params}
    return d


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_legacy_rope_scaling_parses_the_same(style, model_dir, key):
    """``rope_scaling`` + top-level ``rope_theta`` == the ``rope_parameters`` form."""
    with open(os.path.join(model_dir, "config.json")) as f:
        new = json.load(f)
    assert "rope_parameters" in new and "rope_scaling" not in new
    legacy = _to_legacy_rope(new, key)
    assert "rope_parameters" not in legacy
    parsed = coserve_jax.ModelConfig.from_hf_dict(new)
    assert coserve_jax.ModelConfig.from_hf_dict(legacy) == parsed
    theta = {"llama31": 500000.0, "llama32": 500000.0, "qwen25": 1000000.0}[style]
    assert parsed.rope.theta == theta
    if style == "qwen25":
        assert parsed.rope == RopeConfig(theta=theta)
    else:
        assert parsed.rope == RopeConfig(
            theta=theta, rope_type="llama3", factor={"llama31": 8.0, "llama32": 32.0}[style],
            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256,
        )
