"""Finetuning data: JSONL samples turned into token sequences with loss masks.

Three sample formats are accepted, detected per line (or per record) by their keys:

* ``{"text": "..."}``: loss on every token after the first (bos, text, eos).
* ``{"prompt": "...", "completion": "..."}``: loss on the completion tokens and the eos
  that follows them. Prompt and completion are tokenized separately and concatenated,
  so the boundary is exact.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's
  chat template; loss on the assistant turns only (their content and the end-of-turn
  token the template puts after it).

A :class:`TrainSequence` holds the tokens and a loss mask; :func:`labels_and_weights`
turns it into next-token labels and per-position weights whose weighted cross-entropy
sum is the per-sequence mean cross-entropy Hugging Face computes with ``labels`` set to
-100 on non-target tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from coserve_jax.errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OVERLONG_POLICIES = ("truncate", "refuse", "skip")
CHAT_ROLES = ("user", "assistant", "system")
SYNTHETIC_KINDS = ("reverse", "copy", "uppercase", "add")


@dataclasses.dataclass(frozen=True)
class TrainSequence:
    """One training sequence.

    ``loss_mask[p]`` is True when token ``p`` is a target, i.e. the prediction of token
    ``p`` made at position ``p - 1`` counts in the loss; ``loss_mask[0]`` is always False.
    """

    tokens: tuple[int, ...]
    loss_mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and loss_mask ({len(self.loss_mask)}) "
                "differ in length"
            )
        if self.loss_mask and self.loss_mask[0]:
            raise ValueError("loss_mask[0] must be False: the first token has no prediction")

    @property
    def num_targets(self) -> int:
        """How many tokens are targets."""
        return sum(self.loss_mask)


def labels_and_weights(seq: TrainSequence) -> tuple[np.ndarray, np.ndarray]:
    """Next-token labels (int32 [n]) and loss weights (float32 [n]) for a sequence.

    ``labels[p] = tokens[p + 1]`` and ``weights[p] = loss_mask[p + 1] / num_targets`` for
    ``p < n - 1``; the last position has label 0 and weight 0. ``sum(weights * CE)`` is
    the mean cross-entropy over the target tokens.
    """
    num_targets = seq.num_targets
    if num_targets == 0:
        raise ValueError("sequence has no target tokens")
    n = len(seq.tokens)
    labels = np.zeros(n, np.int32)
    labels[:-1] = seq.tokens[1:]
    weights = np.zeros(n, np.float32)
    weights[:-1] = np.asarray(seq.loss_mask[1:], np.float32) / np.float32(num_targets)
    return labels, weights


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How samples become sequences.

    ``overlong`` decides what happens to a sample longer than ``max_seq_len`` tokens:
    "truncate" keeps its first ``max_seq_len`` tokens, "refuse" raises, "skip" drops it
    (counted in ``Dataset.num_skipped``). ``add_bos`` puts the tokenizer's bos first
    (unless a chat template already did); ``add_eos`` appends its eos to text and
    prompt/completion samples. Either is a no-op when the tokenizer lacks that token.
    """

    max_seq_len: int
    overlong: str = "truncate"
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise InvalidRequest(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.overlong not in OVERLONG_POLICIES:
            raise InvalidRequest(
                f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}"
            )


class Dataset(Sequence[TrainSequence]):
    """Tokenized training sequences, with counts of skipped and truncated samples."""

    def __init__(
        self, sequences: list[TrainSequence], num_skipped: int = 0, num_truncated: int = 0
    ) -> None:
        self.sequences = sequences
        self.num_skipped = num_skipped
        self.num_truncated = num_truncated

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int | slice) -> TrainSequence | list[TrainSequence]:
        """One sequence for an int index, a list of them for a slice."""
        return self.sequences[index]

    def __repr__(self) -> str:
        return (
            f"Dataset({len(self)} sequences, num_skipped={self.num_skipped}, "
            f"num_truncated={self.num_truncated})"
        )

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """A permutation of the indices for ``epoch``, deterministic in (seed, epoch)."""
        if epoch < 0 or seed < 0:
            raise ValueError(f"epoch and seed must be non-negative, got {epoch}, {seed}")
        return np.random.default_rng([seed, epoch]).permutation(len(self))


class SampleError(InvalidRequest):
    """A sample that cannot be used; the message names where it came from."""


def load_jsonl(path: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> Dataset:
    """Reads a JSONL file line by line into a Dataset; errors name the 1-based line."""

    def lines() -> Iterator[tuple[str, str]]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}, line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SampleError(f"{where}: not valid UTF-8 ({e})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SampleError(f"{where}: malformed JSON ({e})") from None
                yield where, record

    return _build(lines(), tokenizer, config)


def from_records(
    records: list[dict], tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> Dataset:
    """Builds a Dataset from inline samples; errors name the 0-based record index."""
    if not isinstance(records, list):
        raise InvalidRequest(f"records must be a list, got {type(records).__name__}")
    return _build(((f"record {i}", r) for i, r in enumerate(records)), tokenizer, config)


def _build(
    records: Iterable[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> Dataset:
    sequences: list[TrainSequence] = []
    skipped = truncated = 0
    for where, record in records:
        try:
            tokens, mask = _tokenize(record, tokenizer, config)
        except SampleError as e:
            raise SampleError(f"{where}: {e}") from None
        if not any(mask):
            raise SampleError(f"{where}: sample has no loss tokens")
        if len(tokens) > config.max_seq_len:
            if config.overlong == "skip":
                skipped += 1
                continue
            if config.overlong == "refuse":
                raise SampleError(
                    f"{where}: sample is {len(tokens)} tokens, longer than "
                    f"max_seq_len={config.max_seq_len}"
                )
            tokens, mask = tokens[: config.max_seq_len], mask[: config.max_seq_len]
            truncated += 1
            if not any(mask):
                raise SampleError(
                    f"{where}: no loss tokens remain after truncation to "
                    f"max_seq_len={config.max_seq_len} (use overlong='skip' to drop it)"
                )
        sequences.append(TrainSequence(tuple(tokens), tuple(mask)))
    if not sequences:
        detail = f" ({skipped} skipped as longer than max_seq_len)" if skipped else ""
        raise InvalidRequest(f"no usable samples{detail}")
    return Dataset(sequences, num_skipped=skipped, num_truncated=truncated)


def _tokenize(
    record: Any, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> tuple[list[int], list[bool]]:
    """Tokens and loss mask of one sample, before any length handling."""
    if not isinstance(record, dict):
        raise SampleError(f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys == {"text"}:
        text = _string(record, "text")
        if not text:
            raise SampleError("empty text")
        return _prompt_completion(tokenizer, config, "", text)
    if keys == {"prompt", "completion"}:
        prompt, completion = _string(record, "prompt"), _string(record, "completion")
        return _prompt_completion(tokenizer, config, prompt, completion)
    if keys == {"messages"}:
        return _chat(tokenizer, config, record["messages"])
    for format_keys in ({"prompt", "completion"}, {"text"}, {"messages"}):
        if keys & format_keys and keys <= format_keys:
            raise SampleError(f"missing field(s) {sorted(format_keys - keys)}")
    raise SampleError(
        f"unknown fields {sorted(keys)}: expected {{'text'}}, {{'prompt', 'completion'}} "
        "or {'messages'}"
    )


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise SampleError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _prompt_completion(
    tokenizer: PreTrainedTokenizerBase, config: DataConfig, prompt: str, completion: str
) -> tuple[list[int], list[bool]]:
    """[bos] + prompt + completion + [eos], loss on completion and eos.

    A text sample is a completion with an empty prompt; without a bos its first token is
    still not a target, as nothing predicts it.
    """
    bos = [tokenizer.bos_token_id] if config.add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if config.add_eos and tokenizer.eos_token_id is not None else []
    context = bos + _encode(tokenizer, prompt)
    target = _encode(tokenizer, completion) + eos
    mask = [False] * len(context) + [True] * len(target)
    if mask:
        mask[0] = False
    return context + target, mask


def _chat(
    tokenizer: PreTrainedTokenizerBase, config: DataConfig, messages: Any
) -> tuple[list[int], list[bool]]:
    """The rendered conversation, loss on each assistant turn.

    An assistant turn's tokens are those that rendering ``messages[:i + 1]`` adds to
    ``messages[:i]`` rendered with the generation prompt, less whitespace after the
    turn's last special token (the newline a template puts after its end-of-turn token
    is not something the model generates).
    """
    if not isinstance(messages, list) or not messages:
        raise SampleError("'messages' must be a non-empty list of {role, content} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise SampleError(f"messages[{j}] must be an object with exactly 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise SampleError(f"messages[{j}]: role must be one of {CHAT_ROLES}")
        if not isinstance(message["content"], str):
            raise SampleError(f"messages[{j}]: content must be a string")
    if getattr(tokenizer, "chat_template", None) is None:
        raise SampleError("the tokenizer has no chat template, needed for 'messages' samples")

    def render(prefix: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            ids = tokenizer.apply_chat_template(
                prefix, tokenize=True, add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
        except Exception as e:
            raise SampleError(f"chat template failed: {e}") from None
        return list(ids)

    tokens = render(messages, False)
    mask = [False] * len(tokens)
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise SampleError("the first message must not be from the assistant")
        context = render(messages[:i], True)
        turn = render(messages[: i + 1], False)
        start = len(context)
        if turn[:start] != context or tokens[: len(turn)] != turn:
            raise SampleError(
                "the chat template does not render conversations prefix-consistently, so "
                "assistant turns cannot be located"
            )
        end = len(turn)
        last_special = max((p for p in range(start, end) if tokens[p] in special), default=None)
        if last_special is not None:
            tail = tokenizer.decode(tokens[last_special + 1 : end])
            if not tail.strip():
                end = last_special + 1
        mask[start:end] = [True] * (end - start)
    bos = tokenizer.bos_token_id
    if config.add_bos and bos is not None and tokens[:1] != [bos]:
        tokens, mask = [bos, *tokens], [False, *mask]
    mask[0] = False
    return tokens, mask


def synthetic_task(
    kind: str, n: int, seed: int, min_len: int = 4, max_len: int = 8, max_operand: int = 99
) -> list[dict[str, str]]:
    """``n`` prompt/completion records of a small learnable task, deterministic in seed.

    Kinds: "reverse" (``reverse: abcd\\n`` -> ``dcba``), "copy" (-> ``abcd``), "uppercase"
    (-> ``ABCD``) on random lowercase strings of ``min_len``..``max_len`` characters, and
    "add" (``add: 12+7\\n`` -> ``19``) on integers in 0..``max_operand``.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be non-negative, got {max_operand}")
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    records = []
    for _ in range(n):
        if kind == "add":
            a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
            records.append({"prompt": f"add: {a}+{b}\n", "completion": str(a + b)})
            continue
        length = int(rng.integers(min_len, max_len + 1))
        s = "".join(letters[int(i)] for i in rng.integers(0, len(letters), size=length))
        completion = {"reverse": s[::-1], "copy": s, "uppercase": s.upper()}[kind]
        records.append({"prompt": f"{kind}: {s}\n", "completion": completion})
    return records
