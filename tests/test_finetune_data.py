"""Finetuning data: formats, loss masks, length policies, errors, ordering, synthetic tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from coserve_jax import tiny_model_dir
from coserve_jax.finetune.data import (
    SYNTHETIC_KINDS,
    DataConfig,
    Dataset,
    TrainSequence,
    from_records,
    labels_and_weights,
    load_jsonl,
    synthetic_task,
)

BOS, EOS = 1, 2
CFG = DataConfig(max_seq_len=256)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir())


def ids(text: str) -> list[int]:
    """The byte tokenizer's ids for text: byte b is id 3 + b."""
    return [3 + b for b in text.encode("utf-8")]


def target_spans(tok, seq: TrainSequence) -> list[str]:
    """Each maximal run of target tokens, decoded (special tokens kept)."""
    spans, current = [], []
    for token, is_target in zip(seq.tokens, seq.loss_mask, strict=True):
        if is_target:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def one(tok, record: dict, config: DataConfig = CFG) -> TrainSequence:
    data = from_records([record], tok, config)
    assert len(data) == 1
    return data[0]


def write_jsonl(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- formats and loss masks -------------------------------------------------------------


def test_text_sample(tok):
    seq = one(tok, {"text": "héllo"})
    assert seq.tokens == (BOS, *ids("héllo"), EOS)
    assert seq.loss_mask == (False,) + (True,) * (len(seq.tokens) - 1)
    assert target_spans(tok, seq) == ["héllo</s>"]


def test_text_sample_without_bos_or_eos(tok):
    seq = one(tok, {"text": "abc"}, DataConfig(max_seq_len=64, add_bos=False, add_eos=False))
    assert seq.tokens == tuple(ids("abc"))
    assert seq.loss_mask == (False, True, True)


def test_prompt_completion_sample(tok):
    seq = one(tok, {"prompt": "reverse: ab\n", "completion": "bä"})
    assert seq.tokens == (BOS, *ids("reverse: ab\n"), *ids("bä"), EOS)
    assert target_spans(tok, seq) == ["bä</s>"]
    context = [t for t, m in zip(seq.tokens, seq.loss_mask, strict=True) if not m]
    assert tok.decode(context) == "<s>reverse: ab\n"


def test_prompt_completion_boundary_is_exact(tok):
    # Tokenized separately: a prompt ending mid-word still gives the completion's exact tokens.
    seq = one(tok, {"prompt": "hel", "completion": "lo"}, DataConfig(64, add_eos=False))
    assert seq.loss_mask == (False, False, False, False, True, True)
    assert target_spans(tok, seq) == ["lo"]


def test_empty_prompt_and_empty_completion(tok):
    assert target_spans(tok, one(tok, {"prompt": "", "completion": "x"})) == ["x</s>"]
    assert target_spans(tok, one(tok, {"prompt": "q", "completion": ""})) == ["</s>"]


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4\nok"},
]


def test_chat_sample_masks_assistant_turns(tok):
    seq = one(tok, {"messages": CONVERSATION})
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(seq.tokens) == "<s>" + rendered
    # Content plus the end-of-turn eos; not the newline the template writes after it.
    assert target_spans(tok, seq) == ["yo</s>", "4\nok</s>"]


def test_chat_sample_ending_with_user_turn(tok):
    seq = one(tok, {"messages": CONVERSATION[1:4]})
    assert target_spans(tok, seq) == ["yo</s>"]


def test_chat_without_end_of_turn_token_keeps_whole_turn(tok, monkeypatch):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    monkeypatch.setattr(tok, "chat_template", template)
    seq = one(tok, {"messages": CONVERSATION[1:3]}, DataConfig(64, add_bos=False))
    assert tok.decode(seq.tokens) == "user: hi\nassistant: yo\n"
    assert target_spans(tok, seq) == ["yo\n"]


def test_chat_template_with_bos_is_not_doubled(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{{ bos_token }}" + tok.chat_template)
    seq = one(tok, {"messages": CONVERSATION[1:3]})
    assert seq.tokens[:2] == (BOS, *ids("<"))
    assert target_spans(tok, seq) == ["yo</s>"]


def test_chat_errors(tok, monkeypatch):
    with pytest.raises(ValueError, match="record 0: the first message must not be from the"):
        from_records([{"messages": CONVERSATION[2:3]}], tok, CFG)
    with pytest.raises(ValueError, match="prefix-consistently"):
        monkeypatch.setattr(tok, "chat_template", "{{ messages|length }}" + tok.chat_template)
        from_records([{"messages": CONVERSATION[1:3]}], tok, CFG)
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="record 0: the tokenizer has no chat template"):
        from_records([{"messages": CONVERSATION[1:3]}], tok, CFG)


def test_chat_without_assistant_has_no_loss_tokens(tok):
    with pytest.raises(ValueError, match="record 0: sample has no loss tokens"):
        from_records([{"messages": CONVERSATION[:2]}], tok, CFG)


# --- labels and weights -----------------------------------------------------------------


def test_labels_and_weights_direct(tok):
    seq = one(tok, {"prompt": "ab", "completion": "cd"})
    labels, weights = labels_and_weights(seq)
    assert labels.dtype == np.int32 and weights.dtype == np.float32
    n = len(seq.tokens)
    targets = sum(seq.loss_mask)
    for p in range(n - 1):
        assert labels[p] == seq.tokens[p + 1]
        assert weights[p] == pytest.approx(seq.loss_mask[p + 1] / targets)
    assert weights[-1] == 0
    assert weights.sum() == pytest.approx(1.0)


def test_labels_and_weights_needs_targets():
    with pytest.raises(ValueError, match="no target"):
        labels_and_weights(TrainSequence((1, 5, 6), (False, False, False)))


def test_train_sequence_validation():
    with pytest.raises(ValueError, match="length"):
        TrainSequence((1, 2), (False,))
    with pytest.raises(ValueError, match="loss_mask"):
        TrainSequence((1, 2), (True, True))


def test_weights_reproduce_hugging_face_loss(tok):
    import torch

    records = [
        {"text": "some text"},
        {"prompt": "copy: abcd\n", "completion": "abcd"},
        {"messages": CONVERSATION},
    ]
    rng = np.random.default_rng(0)
    for seq in from_records(records, tok, CFG):
        n, vocab = len(seq.tokens), 320
        logits = rng.normal(size=(n, vocab)) * 3
        labels, weights = labels_and_weights(seq)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce = -log_probs[np.arange(n), labels]
        ours = float((weights * ce).sum())

        hf_labels = torch.tensor([t if m else -100 for t, m in zip(seq.tokens, seq.loss_mask,
                                                                   strict=True)])
        theirs = torch.nn.CrossEntropyLoss(ignore_index=-100)(
            torch.tensor(logits[:-1]), hf_labels[1:]
        ).item()
        assert ours == pytest.approx(theirs, rel=1e-5)


# --- length policies --------------------------------------------------------------------


LONG = {"prompt": "p" * 6, "completion": "c" * 6}  # 1 + 6 + 6 + 1 = 14 tokens


def test_truncate(tok):
    data = from_records([LONG, {"text": "ok"}], tok, DataConfig(max_seq_len=10))
    assert data.num_truncated == 1 and data.num_skipped == 0
    assert data[0].tokens == (BOS, *ids("pppppp"), *ids("ccc"))
    assert target_spans(tok, data[0]) == ["ccc"]
    assert len(data[1].tokens) == 4


def test_truncate_leaving_no_targets_is_an_error(tok):
    with pytest.raises(ValueError, match="record 1: no loss tokens remain after truncation"):
        from_records([{"text": "ok"}, LONG], tok, DataConfig(max_seq_len=5))


def test_refuse(tok):
    config = DataConfig(max_seq_len=10, overlong="refuse")
    with pytest.raises(ValueError, match="record 1: sample is 14 tokens, longer than"):
        from_records([{"text": "ok"}, LONG], tok, config)


def test_skip(tok):
    data = from_records([LONG, {"text": "ok"}, LONG], tok, DataConfig(10, overlong="skip"))
    assert len(data) == 1 and data.num_skipped == 2 and data.num_truncated == 0
    with pytest.raises(ValueError, match="no usable samples"):
        from_records([LONG], tok, DataConfig(10, overlong="skip"))


def test_exact_length_is_not_overlong(tok):
    data = from_records([LONG], tok, DataConfig(14, overlong="refuse"))
    assert len(data[0].tokens) == 14 and data.num_truncated == 0


def test_data_config_validation():
    with pytest.raises(ValueError, match="overlong"):
        DataConfig(16, overlong="drop")
    with pytest.raises(ValueError, match="max_seq_len"):
        DataConfig(1)


# --- files and errors -------------------------------------------------------------------


def test_load_jsonl_skips_blank_lines(tok, tmp_path):
    path = write_jsonl(tmp_path, [
        json.dumps({"text": "one"}),
        "",
        "   ",
        json.dumps({"prompt": "a", "completion": "b"}),
        json.dumps({"messages": CONVERSATION}),
    ])
    data = load_jsonl(path, tok, CFG)
    assert len(data) == 3
    assert [target_spans(tok, s) for s in data] == [
        ["one</s>"], ["b</s>"], ["yo</s>", "4\nok</s>"]
    ]
    assert data[0] == from_records([{"text": "one"}], tok, CFG)[0]


BAD_LINES = {
    "{not json": "malformed JSON",
    "[1, 2]": "expected a JSON object, got list",
    '"text"': "expected a JSON object, got str",
    '{"txt": "x"}': "unknown fields",
    '{"text": "x", "extra": 1}': "unknown fields",
    '{"prompt": "x"}': r"missing field\(s\) \['completion'\]",
    '{"completion": "x"}': r"missing field\(s\) \['prompt'\]",
    "{}": "unknown fields",
    '{"text": 3}': "'text' must be a string, got int",
    '{"text": null}': "'text' must be a string, got NoneType",
    '{"prompt": "x", "completion": ["y"]}': "'completion' must be a string, got list",
    '{"text": ""}': "empty text",
    '{"messages": "hi"}': "'messages' must be a non-empty list",
    '{"messages": []}': "'messages' must be a non-empty list",
    '{"messages": ["hi"]}': r"messages\[0\] must be an object",
    '{"messages": [{"role": "user"}]}': r"messages\[0\] must be an object",
    '{"messages": [{"role": "bot", "content": "x"}]}': r"messages\[0\]: role must be",
    '{"messages": [{"role": "user", "content": 1}]}': r"messages\[0\]: content must be",
}


@pytest.mark.parametrize("bad, message", BAD_LINES.items(), ids=list(BAD_LINES))
def test_errors_name_the_line(tok, tmp_path, bad, message):
    good = json.dumps({"text": "fine"})
    path = write_jsonl(tmp_path, [good, "", good, bad, good])
    with pytest.raises(ValueError, match=f"line 4: {message}"):
        load_jsonl(path, tok, CFG)
    if bad != "{not json":  # the same sample sent inline names its record index
        with pytest.raises(ValueError, match=f"record 1: {message}"):
            from_records([json.loads(good), json.loads(bad)], tok, CFG)


def test_invalid_utf8_names_the_line(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_jsonl(str(path), tok, CFG)


def test_no_loss_tokens_names_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"text": "x"}), json.dumps({"text": "y"})])
    with pytest.raises(ValueError, match="line 1: sample has no loss tokens"):
        load_jsonl(path, tok, DataConfig(16, add_bos=False, add_eos=False))


def test_overlong_refuse_names_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path, ["", json.dumps({"text": "x" * 20})])
    with pytest.raises(ValueError, match="line 2: sample is 22 tokens"):
        load_jsonl(path, tok, DataConfig(16, overlong="refuse"))


def test_empty_dataset(tok, tmp_path):
    with pytest.raises(ValueError, match="no usable samples"):
        load_jsonl(write_jsonl(tmp_path, ["", ""]), tok, CFG)
    with pytest.raises(ValueError, match="no usable samples"):
        from_records([], tok, CFG)


# --- ordering ---------------------------------------------------------------------------


def test_order_is_deterministic_and_epoch_dependent():
    seq = TrainSequence((1, 5), (False, True))
    data = Dataset([seq] * 50)
    first = data.order(epoch=0, seed=7)
    assert sorted(first.tolist()) == list(range(50))
    np.testing.assert_array_equal(first, data.order(epoch=0, seed=7))
    assert not np.array_equal(first, data.order(epoch=1, seed=7))
    assert not np.array_equal(first, data.order(epoch=0, seed=8))
    np.testing.assert_array_equal(first, np.random.default_rng([7, 0]).permutation(50))


# --- synthetic tasks --------------------------------------------------------------------


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_task(tok, kind):
    records = synthetic_task(kind, 20, seed=3)
    assert records == synthetic_task(kind, 20, seed=3)
    assert records != synthetic_task(kind, 20, seed=4)
    for r in records:
        assert set(r) == {"prompt", "completion"}
        assert r["prompt"].startswith(f"{kind}: ") and r["prompt"].endswith("\n")
        x = r["prompt"][len(kind) + 2 : -1]
        if kind == "add":
            a, b = (int(v) for v in x.split("+"))
            assert 0 <= a <= 99 and 0 <= b <= 99
            assert r["completion"] == str(a + b)
        else:
            assert 4 <= len(x) <= 8 and x.isalpha() and x.islower()
            expected = {"reverse": x[::-1], "copy": x, "uppercase": x.upper()}[kind]
            assert r["completion"] == expected
    data = from_records(records, tok, DataConfig(max_seq_len=32, overlong="refuse"))
    assert [target_spans(tok, s) for s in data] == [[r["completion"] + "</s>"] for r in records]


def test_synthetic_task_validation():
    with pytest.raises(ValueError, match="kind"):
        synthetic_task("sort", 3, seed=0)
    with pytest.raises(ValueError, match="min_len"):
        synthetic_task("copy", 3, seed=0, min_len=5, max_len=4)
