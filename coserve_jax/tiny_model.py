"""The embedded default model: a small random-weight Llama generated from a fixed seed.

It is written in Hugging Face format (config.json, model.safetensors and a
byte-level tokenizer built with the tokenizers library) into a cache directory
on first use, so a fresh machine never downloads anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from coserve_jax.config import ModelConfig

TINY_MODEL_VERSION = "v2"
TINY_SEED = 20260101
# A frozen random LM head of std 0.02 caps every logit margin near ln(vocab), so no
# adapter could push a token's probability far above 1/3; a wider head leaves room
# for finetuning demos to reach low loss.
TINY_HEAD_STD = 0.1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; byte b is id 3 + b
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


SMALL_MODEL_VERSION = "v1"
SMALL_SEED = 20260102
# SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads, vocab 49152) with random
# weights: a second benchmark tier, so CPU figures are not only those of a model that
# fits in the processor's cache. The byte tokenizer uses the first 259 ids.
SMALL_HF_CONFIG = TINY_HF_CONFIG | {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def cache_root() -> str:
    """Where generated artefacts live: $COSERVE_HOME or ~/.cache/coserve_jax."""
    return os.environ.get("COSERVE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "coserve_jax"
    )


def tiny_model_dir() -> str:
    """Path of the embedded default model, generating it on first call."""
    return _generated_model(f"tiny-llama-{TINY_MODEL_VERSION}", TINY_HF_CONFIG, TINY_SEED,
                            TINY_HEAD_STD)


def small_model_dir() -> str:
    """Path of the small benchmark tier (SmolLM2-135M shapes, random float32 weights, the
    byte tokenizer), generating it on first call (about 540 MB)."""
    return _generated_model(f"small-llama-{SMALL_MODEL_VERSION}", SMALL_HF_CONFIG, SMALL_SEED,
                            None)


def _generated_model(name: str, hf_config: dict, seed: int, head_std: float | None) -> str:
    target = os.path.join(cache_root(), "models", name)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent caller never
    # sees a half-written model.
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(target))
    try:
        write_random_model(tmp, hf_config, seed, head_std=head_std)
        save_byte_tokenizer(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_random_model(path: str, hf_config: dict, seed: int,
                       head_std: float | None = None) -> None:
    """Writes config.json and model.safetensors with seeded random weights (no torch)."""
    import json

    from safetensors.numpy import save_file

    from coserve_jax.models.llama import init_random_params

    cfg = ModelConfig.from_hf_dict(hf_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(init_random_params(cfg, seed, head_std=head_std),
              os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def save_byte_tokenizer(path: str) -> None:
    """Saves a byte-level tokenizer: three special tokens, then one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {byte_chars[b]: len(SPECIAL_TOKENS) + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)
