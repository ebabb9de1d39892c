"""LoRA parity with Hugging Face PEFT (PyTorch, CPU, float32, eager attention).

On the three tiny checkpoint styles of ``hf_models.py``, adapters built and saved
by PEFT (random non-zero A and B on every projection, plain and rsLoRA scaling,
and a rank-4 adapter on a subset of projections):

1. the dense forward with a loaded adapter matches the PEFT model's logits;
2. the engine's paged greedy generation with an adapter matches PEFT's ``generate``;
3. one engine serving three adapters and the base model in shared steps gives each
   request what it gets alone and what the dense forward's greedy loop gives;
4. token-level finetuning in the engine accumulates PEFT's ``loss.backward()``
   gradients (a loss mask that skips a prompt and a few targets);
5. an adapter trained in the engine and exported loads in PEFT with the same logits.

Every comparison uses rel_err(ours, ref) = max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import functools
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import coserve_jax
from coserve_jax import (
    Engine,
    EngineConfig,
    FinetuneJob,
    LoraConfig,
    OptimizerConfig,
    SamplingParams,
    load_adapter,
)
from coserve_jax.finetune.data import Dataset, TrainSequence
from coserve_jax.lora.config import ALL_TARGETS

from hf_models import STYLES, hf_config, load_hf_model
from support import relative_error

TOL = 1e-4
VOCAB = hf_config("llama31").vocab_size
B_STD = 0.05  # lora_B init: changes the logits of these models by ~60% (PEFT inits it to 0)
MAX_TOKENS = 16

# name -> PEFT LoraConfig kwargs of the test adapters (random weights, not trained)
ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=list(ALL_TARGETS)),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=list(ALL_TARGETS)),
    "small": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
}

# One bucket per engine (T=32, S=4, W=16 pages): a single compile of the step per model.
# Prompts of up to 30 tokens plus 16 new ones fit in 64; batches of prompts above 32
# tokens are chunked, so decodes run next to prefill chunks.
SERVE_CONFIG = EngineConfig.flat(
    page_size=4, num_pages=128, max_num_seqs=4, max_num_batched_tokens=32,
    min_token_bucket=32, min_seq_bucket=4, min_page_bucket=16, max_model_len=64,
    max_lora_rank=8, max_train_seqs=0)
TRAIN_CONFIG = EngineConfig.flat(
    page_size=4, num_pages=128, max_num_seqs=4, max_num_batched_tokens=32,
    min_token_bucket=32, min_seq_bucket=4, min_page_bucket=16, max_model_len=64,
    max_lora_rank=8, max_train_seqs=1, max_train_len=64, train_window=16, backward_layers=1)
PROMPT_LENGTHS = (5, 13, 30)


def random_tokens(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape, dtype=np.int64)


@functools.cache
def our_model(path: str) -> coserve_jax.Model:
    return coserve_jax.load_model(path, progress=False)


def hf_base(path: str):
    model = load_hf_model(path)
    # Greedy parity runs with ignore_eos on our side: transformers must not stop either.
    model.generation_config.eos_token_id = None
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def check_margin(row: np.ndarray, what: str) -> None:
    """Precondition of a greedy comparison, not a tolerance: the top-1 logit leads the
    runner-up by more than twice the parity tolerance, so any computation within TOL
    of this one picks the same token."""
    top2 = np.sort(row)[-2:]
    assert top2[1] - top2[0] > 2 * TOL * np.abs(row).max(), f"near-tie at {what}; re-seed"


def peft_load(base_path: str, adapter_path: str, trainable: bool = False):
    """PeftModel.from_pretrained, failing on any warning about missing/unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_base(base_path), adapter_path,
                                            is_trainable=trainable)
    bad = [str(w.message) for w in caught
           if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return pm.eval()


@functools.cache
def _peft_adapter_dirs(base_path: str, root: str) -> dict[str, str]:
    out = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(200 + seed)
        pm = peft.get_peft_model(hf_base(base_path),
                                 peft.LoraConfig(lora_dropout=0.0, **kwargs))
        with torch.no_grad():
            for mod in pm.modules():
                if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                    mod.lora_B["default"].weight.normal_(0.0, B_STD)
        path = f"{root}/{name}"
        pm.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """style -> {adapter name -> PEFT-saved adapter dir}, built on first use."""
    root = tmp_path_factory.mktemp("lora-parity")

    def get(style: str, base_path: str) -> dict[str, str]:
        return _peft_adapter_dirs(base_path, str(root / style))

    return get


@pytest.fixture(scope="module", params=STYLES)
def style(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(request, style) -> str:
    return request.getfixturevalue(f"{style}_dir")


@pytest.fixture(scope="module")
def adapters_of_style(adapter_dirs, style, model_dir) -> dict[str, str]:
    return adapter_dirs(style, model_dir)


# ----- 1. logits ----------------------------------------------------------------------------


def test_logits_match_peft(model_dir, adapters_of_style):
    """forward_logits with a loaded PEFT adapter == the PEFT model's logits."""
    ours = our_model(model_dir)
    tokens = random_tokens(11, 2, 48)
    base = hf_logits(hf_base(model_dir), tokens)
    for name, path in adapters_of_style.items():
        adapter = load_adapter(ours, path)
        kwargs = ADAPTERS[name]
        assert adapter.config.use_rslora == kwargs.get("use_rslora", False)
        assert adapter.config.target_modules == tuple(
            m for m in ALL_TARGETS if m in kwargs["target_modules"])
        assert all(np.abs(adapter.b[m]).min() > 0 for m in adapter.config.target_modules)
        got = coserve_jax.forward_logits(ours, tokens, adapter=adapter)
        want = hf_logits(peft_load(model_dir, path), tokens)
        err, effect = relative_error(got, want), relative_error(base, want)
        print(f"{name}: rel_err={err:.2e}, adapter effect={effect:.2f}")
        assert err <= TOL, name
        assert effect > 100 * TOL, name  # the adapter really changes the logits


# ----- 2. paged greedy generation -----------------------------------------------------------


def test_paged_greedy_with_adapter_matches_peft(model_dir, adapters_of_style):
    """generate(..., adapter=) through the paged engine == PEFT's greedy generate."""
    ours = our_model(model_dir)
    prompts = [random_tokens(300 + i, n).tolist() for i, n in enumerate(PROMPT_LENGTHS)]
    for name, path in adapters_of_style.items():
        pm = peft_load(model_dir, path)
        expected = []
        for prompt in prompts:
            with torch.no_grad():
                out = pm.generate(
                    input_ids=torch.tensor([prompt]), do_sample=False,
                    max_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
            new = out.sequences[0, len(prompt):].tolist()
            assert len(new) == MAX_TOKENS
            for step, logits in enumerate(out.logits):
                check_margin(logits[0].numpy(), f"{name} prompt {len(prompt)} step {step}")
            expected.append(new)
        got = coserve_jax.generate(ours, prompts, MAX_TOKENS, engine_config=SERVE_CONFIG,
                                   adapter=load_adapter(ours, path), ignore_eos=True)
        for prompt, g, e in zip(prompts, got, expected, strict=True):
            assert g == e, f"{name}: prompt of {len(prompt)} tokens diverges"


# ----- 3. mixed batches ---------------------------------------------------------------------


def dense_greedy(model, prompts: list[list[int]], n: int, adapter, width: int = 64):
    """Greedy continuations by re-running forward_logits on the whole sequence per token.

    Sequences are right-padded to ``width``: the forward is causal, so the logits at a
    sequence's last real position do not see the padding, and one shape compiles once.
    """
    rows = [list(p) for p in prompts]
    for step in range(n):
        arr = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            arr[i, :len(r)] = r
        logits = coserve_jax.forward_logits(model, arr, adapter=adapter)
        for i, r in enumerate(rows):
            row = logits[i, len(r) - 1]
            check_margin(row, f"dense greedy row {i} step {step}")
            r.append(int(np.argmax(row)))
    return [r[len(p):] for r, p in zip(rows, prompts, strict=True)]


def test_mixed_adapters_share_steps(qwen25_dir, adapter_dirs):
    """Three adapters and the base model in one engine, in shared steps: each request
    gets the tokens it gets alone and the dense reference's greedy tokens."""
    ours = our_model(qwen25_dir)
    dirs = adapter_dirs("qwen25", qwen25_dir)
    adapters = {name: load_adapter(ours, path) for name, path in dirs.items()}
    groups = [None, *adapters]  # None: the base model
    # Two prompts per group, submitted interleaved so every step mixes groups.
    prompts = {g: [random_tokens(500 + 10 * k + j, n).tolist()
                   for j, n in enumerate((3 + 4 * k, 21 - 3 * k))]
               for k, g in enumerate(groups)}

    engine = Engine(ours, SERVE_CONFIG)
    for adapter in adapters.values():
        engine.load_adapter(adapter)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    owner = {}
    for j in range(2):
        for g in groups:
            owner[engine.add_request(prompts[g][j], params, adapter=g)] = (g, j)
    mixed: dict[tuple, list[int]] = {}
    step_groups = []
    while engine.has_unfinished():
        outs = engine.step()
        step_groups.append({owner[o.request_id][0] for o in outs})
        for o in outs:
            if o.finished:
                mixed[owner[o.request_id]] = o.output_token_ids
    assert len(mixed) == 2 * len(groups)
    # Every group (base model included) produced tokens in one and the same step.
    assert any(s == set(groups) for s in step_groups), step_groups

    for g in groups:
        adapter = None if g is None else adapters[g]
        alone = coserve_jax.generate(ours, prompts[g], MAX_TOKENS, engine_config=SERVE_CONFIG,
                                     adapter=adapter, ignore_eos=True)
        dense = dense_greedy(ours, prompts[g], MAX_TOKENS, adapter)
        for j in range(2):
            assert mixed[g, j] == alone[j], (g, j)
            assert mixed[g, j] == dense[j], (g, j)
    # The groups differ, so a request served with the wrong slot would be caught.
    firsts = {tuple(mixed[g, 0]) for g in groups}
    assert len(firsts) == len(groups)


# ----- 4 and 5. finetuning ------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_engine(llama31_dir) -> Engine:
    return Engine(our_model(llama31_dir), TRAIN_CONFIG)


def masked_sequence(seed: int, n: int, prompt: int) -> TrainSequence:
    """Random tokens; targets after a ``prompt``-token prefix, with a few holes."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, n).tolist()
    mask = [p >= prompt and rng.random() < 0.8 for p in range(n)]
    mask[-1] = True
    return TrainSequence(tuple(tokens), tuple(mask))


def test_gradients_match_peft_backward(llama31_dir, adapter_dirs, train_engine):
    """The engine's accumulated LoRA gradients of one sequence == PEFT's loss.backward()."""
    path = adapter_dirs("llama31", llama31_dir)["plain"]
    ours = our_model(llama31_dir)
    adapter = load_adapter(ours, path)
    seq = masked_sequence(7, 40, prompt=12)
    assert 0 < seq.num_targets < 28

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS)
    assert lora == adapter.config
    # Two sequences per step and max_steps=1: the first sequence's gradients stay in the
    # accumulator (no optimizer step) for us to read.
    job = FinetuneJob("g", Dataset([seq, seq]), lora=lora, sequences_per_step=2, max_steps=1)
    engine = train_engine
    engine.submit_job(job)
    trainer = engine.trainer
    run = trainer.jobs["g"]
    engine.runner.jobs["g"].params = {
        m: {"a": jnp.asarray(adapter.a[m]), "b": jnp.asarray(adapter.b[m])}
        for m in lora.target_modules}
    engine.registry.write(run.slot, trainer.adapter_of(run))
    for _ in range(100):
        if run.seqs_done:
            break
        engine.step()
    assert run.step == 0
    buf = engine.runner.train
    got = {m: (np.asarray(buf.grad_a[m][:, run.slot, :, :lora.r]),
               np.asarray(buf.grad_b[m][:, run.slot, :lora.r, :])) for m in lora.target_modules}
    our_loss = run.loss_in_step
    engine.cancel_job("g")

    pm = peft_load(llama31_dir, path, trainable=True)
    labels = torch.tensor([[t if keep else -100 for t, keep in zip(seq.tokens, seq.loss_mask,
                                                                   strict=True)]])
    loss = pm(input_ids=torch.tensor([seq.tokens]), labels=labels).loss
    loss.backward()
    print(f"loss ours={our_loss:.6f} peft={loss.item():.6f}")
    assert abs(our_loss - loss.item()) <= TOL * abs(loss.item())
    layers = pm.base_model.model.model.layers
    worst = 0.0
    for m in lora.target_modules:
        parent = "self_attn" if m in ALL_TARGETS[:4] else "mlp"
        mods = [getattr(getattr(layer, parent), m) for layer in layers]
        want_a = np.stack([mod.lora_A["default"].weight.grad.numpy().T for mod in mods])
        want_b = np.stack([mod.lora_B["default"].weight.grad.numpy().T for mod in mods])
        assert np.abs(want_a).max() > 0 and np.abs(want_b).max() > 0
        err_a, err_b = relative_error(got[m][0], want_a), relative_error(got[m][1], want_b)
        worst = max(worst, err_a, err_b)
        assert err_a <= TOL, (m, "A", err_a)
        assert err_b <= TOL, (m, "B", err_b)
    print(f"worst gradient rel_err={worst:.2e}")


def test_trained_adapter_loads_in_peft(llama31_dir, train_engine, tmp_path):
    """A job trained here and exported: PEFT's logits == ours with the trained adapter."""
    ours = our_model(llama31_dir)
    data = Dataset([masked_sequence(40 + i, 36 + 3 * i, prompt=8) for i in range(4)])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS)  # padded to rank 8
    export = str(tmp_path / "trained")
    job = FinetuneJob("t", data, lora=lora, sequences_per_step=2, max_steps=2,
                      optimizer=OptimizerConfig(learning_rate=1e-2), export_dir=export)
    engine = train_engine
    engine.submit_job(job)
    for _ in range(500):
        if engine.job_progress("t").state != "running":
            break
        engine.step()
    progress = engine.job_progress("t")
    assert progress.state == "completed" and progress.step == 2, progress
    trained = engine.trained_adapter("t")
    for m in ALL_TARGETS:
        assert np.abs(trained.b[m]).max() > 0, m  # B starts at zero: it really trained

    exported = load_adapter(ours, export)
    assert exported.config == lora
    for m in ALL_TARGETS:
        np.testing.assert_array_equal(exported.a[m], trained.a[m])
        np.testing.assert_array_equal(exported.b[m], trained.b[m])

    tokens = random_tokens(13, 2, 48)
    got = coserve_jax.forward_logits(ours, tokens, adapter=trained)
    want = hf_logits(peft_load(llama31_dir, export), tokens)
    base = coserve_jax.forward_logits(ours, tokens)
    err, effect = relative_error(got, want), relative_error(base, want)
    print(f"trained adapter: rel_err={err:.2e}, effect={effect:.2e}")
    assert err <= TOL
    assert effect > 10 * TOL
