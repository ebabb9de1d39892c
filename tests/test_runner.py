"""The runner as the one owner of device state: every change is a command, every command is
mirrored to multi-host followers, and replaying the commands rebuilds the state exactly."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, SamplingParams
from coserve_jax.finetune.data import Dataset, TrainSequence
from coserve_jax.runner_commands import COMMANDS, WriteSlot
from sharding import distributed
from sharding.distributed import MIRRORED, Leader

from support import random_adapter, random_sequence, tiny_model

FLAT = dict(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16,
            min_token_bucket=16, min_seq_bucket=4, max_model_len=64, max_lora_rank=8,
            max_adapters=2, max_train_seqs=1, max_train_len=32, train_window=16,
            backward_layers=2)
CONFIG = EngineConfig.flat(**FLAT)


class RecordingChannel:
    """Stands in for the broadcast: keeps what the leader sends, pickled as it travels."""

    def __init__(self):
        self.messages = []

    def send(self, message) -> None:
        self.messages.append(pickle.loads(pickle.dumps(message)))


def test_every_runner_command_is_mirrored():
    missing = [c.__name__ for c in COMMANDS if c not in MIRRORED]
    assert not missing, f"runner commands the followers would not apply: {missing}"
    assert set(MIRRORED) == set(COMMANDS)


def test_the_leader_refuses_a_command_it_does_not_mirror(monkeypatch):
    engine = Engine(tiny_model(), CONFIG)
    channel = RecordingChannel()
    monkeypatch.setattr(distributed, "MIRRORED", tuple(c for c in MIRRORED if c is not WriteSlot))
    with Leader(engine.runner, channel), pytest.raises(TypeError,
                                                       match="WriteSlot is not mirrored"):
        engine.load_adapter(random_adapter("a", tiny_model().config, 4, 1))
    assert channel.messages == [("stop",)]


def test_replayed_commands_rebuild_the_device_state():
    """A follower that executes the leader's commands, and nothing else, ends with the same
    KV pages, adapter slots, finetuning buffers and job weights as the leader."""
    model = tiny_model()
    leader_engine = Engine(model, CONFIG)
    channel = RecordingChannel()
    rng = np.random.default_rng(0)
    with Leader(leader_engine.runner, channel):
        leader_engine.load_adapter(random_adapter("ad", model.config, 4, 3))
        seq = TrainSequence(tuple(rng.integers(3, 259, 24).tolist()), (False, *[True] * 23))
        leader_engine.submit_job(FinetuneJob("job", Dataset([seq, seq]),
                                             lora=LoraConfig(r=4, lora_alpha=8), max_steps=1,
                                             sequences_per_step=2))
        for name in (None, "ad", None):
            leader_engine.add_request(rng.integers(3, 259, 9).tolist(),
                                      SamplingParams(max_tokens=5, ignore_eos=True),
                                      adapter=name)
        while leader_engine.has_unfinished():
            leader_engine.step()
        trained = leader_engine.trained_adapter("job")
    assert channel.messages[-1] == ("stop",)
    kinds = {type(m[1]).__name__ for m in channel.messages[:-1]}
    assert {"WriteSlot", "StartJob", "RunStep", "RunBackwardPiece", "ApplyUpdate",
            "GatherJob"} <= kinds

    follower_engine = Engine(model, CONFIG)  # built, then driven by the commands alone
    for _, command in channel.messages[:-1]:
        follower_engine.runner.execute(command)
    ours, theirs = leader_engine.runner, follower_engine.runner
    for what in ("kv", "slots", "train", "feed"):
        for a, b in zip(jax.tree.leaves(getattr(ours, what)),
                        jax.tree.leaves(getattr(theirs, what)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
    for m, a in trained.a.items():
        np.testing.assert_array_equal(a, np.asarray(theirs.jobs["job"].params[m]["a"]))


def _assert_in_step_layout(runner) -> None:
    """Every device-state leaf is in exactly the sharding the step declares for it (an
    equivalent spec is not enough: jit's dispatch cache tells ``P()`` from
    ``P(None, None)``, and a miss can re-trace the step mid-serving)."""
    layout = runner.layout
    for what in ("kv", "train", "slots", "feed"):
        tree = getattr(runner, what)
        specs = layout.replicated_specs(tree) if what == "feed" else layout.specs(tree)
        leaves = jax.tree.leaves(tree)
        specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for leaf, spec in zip(leaves, specs, strict=True):
            assert leaf.sharding == NamedSharding(layout.mesh, spec), (what, leaf.sharding, spec)


@pytest.mark.parametrize("overrides,counter", [
    (dict(finetune_unit="samples"), "whole_samples"),
    (dict(finetune_unit="tokens", backward_block=8), "backward_pieces"),
])
def test_every_program_hands_the_state_back_in_the_step_layout(overrides, counter):
    """Whole samples, token-block pieces, the step and the optimizer update all leave the
    state as the step takes it, so steady serving never leaves jit's fast dispatch path."""
    engine = Engine(tiny_model(), EngineConfig.flat(**{**FLAT, **overrides}))
    rng = np.random.default_rng(1)
    data = Dataset([random_sequence(rng, n) for n in (20, 31, 12)])
    engine.submit_job(FinetuneJob("job", data, lora=LoraConfig(r=4, lora_alpha=8),
                                  max_steps=2, sequences_per_step=1))
    run = engine.trainer.jobs["job"]
    _assert_in_step_layout(engine.runner)
    for i in range(200):
        if i % 4 == 0 and i < 20:
            engine.add_request(rng.integers(3, 259, 7).tolist(),
                               SamplingParams(max_tokens=3, ignore_eos=True))
        engine.step()
        _assert_in_step_layout(engine.runner)
        if run.state != "running" and not engine.has_unfinished():
            break
    assert run.step == 2 and engine.counters[counter] > 0
