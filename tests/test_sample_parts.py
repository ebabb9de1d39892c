"""coserve's samples run in parts (``FinetuneConfig.sample_segments``): a sample whose whole
program is too long for a request arriving during it runs as 2K - 1 programs over K
segments of layers, in iterations of their own between the requests' steps, with the
gradients of the whole sample."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_finetune_unit import CONFIG, _job

from coserve_jax import Engine, EngineConfig, SamplingParams
from coserve_jax.latency import sample_key, sample_part_key
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.slo import SLO
from coserve_jax.step import head_cost_layers, segment_bounds

from support import engine_grads, random_sequence, relative_error, tiny_model, whole_sequence_grads


def _heaviest_part(bounds: list[int], head_layers: float) -> float:
    """The costliest of a sample's parts under ``bounds``, in layer forwards: a lower
    segment's forward or backward (one pass over its layers), or the top part (both passes
    over its layers, and the head)."""
    sizes = np.diff(bounds)
    return max([*sizes[:-1], 2 * sizes[-1] + head_layers])


def test_segments_make_the_heaviest_part_as_light_as_any_split_does():
    """Against every split of the layers into contiguous segments (all of them, enumerated):
    no split has a lighter heaviest part, the lower segments are never empty and differ by
    at most one layer."""
    assert segment_bounds(4, 1) == [0, 4]
    # Equal segments made the small tier's top part (the head alone is 16 layer forwards:
    # hidden 576, vocab 49152) 3.5-4x the others; by cost it holds no layer at all.
    assert segment_bounds(30, 4, head_layers=16.0) == [0, 10, 20, 30, 30]
    assert segment_bounds(32, 4, head_layers=4.8) == [0, 10, 20, 30, 32]  # Llama-3.1-8B
    for layers in range(1, 9):
        for segments in range(1, layers + 1):
            for head in (0.0, 0.2, 1.5, 5.0):
                bounds = segment_bounds(layers, segments, head)
                lower = np.diff(bounds)[:-1]
                assert bounds[0] == 0 and bounds[-1] == layers and len(bounds) == segments + 1
                if segments > 1:
                    assert lower.min() >= 1 and lower.max() - lower.min() <= 1
                best = min(_heaviest_part([0, *cuts, layers], head)
                           for cuts in itertools.combinations(range(1, layers + 1),
                                                              segments - 1))
                assert _heaviest_part(bounds, head) == best, (layers, segments, head, bounds)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1 to 4 segments"):
            segment_bounds(4, bad)


def test_the_head_weighs_in_layer_forwards():
    """The small tier's head (hidden 576, vocab 49152) costs 16 of its layers' forwards;
    the tiny tier's (vocab 320) a fifth of one."""
    from coserve_jax.config import ModelConfig
    from coserve_jax.tiny_model import SMALL_HF_CONFIG, TINY_HF_CONFIG
    small = head_cost_layers(ModelConfig.from_hf_dict(SMALL_HF_CONFIG))
    tiny = head_cost_layers(ModelConfig.from_hf_dict(TINY_HF_CONFIG))
    assert small == pytest.approx(16.0) and tiny == pytest.approx(0.208, abs=1e-3)


@pytest.mark.parametrize("segments,length,serve", [(2, 23, False), (3, 41, True)])
def test_a_sample_run_in_parts_accumulates_the_whole_sequence_jax_grad(segments, length,
                                                                      serve):
    """The parts of one sample add up to the gradient of the whole sequence, with nothing
    run at token level. Over the tiny model's 4 layers, 2 segments are sizes 3 and 1; 3
    segments are 2, 2 and an empty top one, whose part runs the head and the loss alone."""
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(length), length)
    adapter, got, engine = engine_grads(model, seq, window=8, backward_layers=1, serve=serve,
                                        sample_segments=segments)
    counters = engine.counters
    assert counters["sample_parts"] == 2 * segments - 1
    assert counters["whole_samples"] == 0 and counters["backward_pieces"] == 0
    assert engine.runner.sample_part_h is None  # (the first segment has no input gradient)
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")


@pytest.mark.parametrize("part_s", [0.01, 10.0])
def test_a_sample_too_long_to_run_whole_runs_in_parts_between_the_requests_steps(part_s):
    """Samples of the 64 bucket are priced at 10 s whole against a 5 s default TTFT. With
    parts of 10 ms they run in parts (7 iterations each), between the requests' steps;
    shorter samples still run whole; nothing goes at token level. With parts of 10 s the
    longest part is too long as well, and those samples run at token level."""
    model = tiny_model()
    engine = Engine(model, EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                             default_ttft_s=5.0))
    engine.submit_job(_job([10, 12, 40, 20, 9, 14, 50, 11, 13, 15], steps=5))
    trainer, run = engine.trainer, engine.trainer.jobs["t"]
    for _ in range(2):  # compile the sample program
        engine.step()
    trainer.warmup_sample_parts(progress=False, skip=lambda n: n != 64)  # and the parts'
    engine.latency.times |= {sample_key(16): 0.01, sample_key(32): 0.01, sample_key(64): 10.0}
    count = trainer.sample_parts
    engine.latency.times |= {sample_part_key(64, i, count): part_s for i in range(count)}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 259, size=n).tolist() for n in (9, 14, 6)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True),
                              slo=SLO(ttft_s=60.0, tpot_s=60.0), admission=False)
           for p in prompts]
    done, kinds, token_level = {}, [], False
    while len(done) < len(ids):
        before = engine.counters.copy()
        outputs = engine.step()
        done |= {o.request_id: o.output_token_ids for o in outputs if o.finished}
        ran = engine.counters - before
        kinds.append("part" if ran["sample_parts"] else
                     "whole" if ran["whole_samples"] else "step" if ran["steps"] else "")
        token_level |= bool(run.inflight)
        assert trainer.sample_in_parts() == (engine.counters["sample_parts"] % count > 0)
    assert all(len(done[i]) == 24 for i in ids)
    assert "whole" in kinds
    if part_s < 1:
        assert not token_level and kinds.count("part") >= count
        first, last = kinds.index("part"), len(kinds) - 1 - kinds[::-1].index("part")
        assert "step" in kinds[first:last]  # the requests step between a sample's parts
    else:
        assert token_level and "part" not in kinds


def test_a_cancelled_job_frees_its_sample_in_parts():
    model = tiny_model()
    engine = Engine(model, EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                             default_ttft_s=5.0))
    engine.submit_job(_job([40, 50], steps=5))
    engine.latency.times |= {sample_key(64): 10.0}
    engine.latency.times |= {sample_part_key(64, i, 7): 0.01 for i in range(7)}
    trainer, run = engine.trainer, engine.trainer.jobs["t"]
    engine.step()
    assert trainer.sample_in_parts() and engine.runner.sample_part_h is not None
    assert run.seqs_started == 1
    engine.cancel_job("t")
    assert not trainer.sample_in_parts() and not trainer.has_sample_work()
    assert engine.runner.sample_part_h is None and run.seqs_started == 0
    engine.step()  # nothing left to run
    assert engine.counters["sample_parts"] == 1


@pytest.mark.parametrize("tpot_s,part", [(0.5, True), (60.0, False), (None, False)])
def test_a_sample_longer_than_the_requests_tpot_target_runs_in_parts(tpot_s, part):
    """A 1 s sample (short enough for an arrival's 5 s TTFT) runs in parts while a request
    with a 0.5 s TPOT target runs, whole beside one with a 60 s target, and whole when no
    request runs (``tpot_s`` None)."""
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                                    default_ttft_s=5.0))
    engine.submit_job(_job([40, 50], steps=5))
    count = engine.trainer.sample_parts
    engine.latency.times |= {sample_key(64): 1.0}
    engine.latency.times |= {sample_part_key(64, i, count): 0.1 for i in range(count)}
    if tpot_s is not None:
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True),
                           slo=SLO(ttft_s=60.0, tpot_s=tpot_s), admission=False)
    assert engine.scheduler._sample_unit() == ((0.1, True) if part else (1.0, False))


def test_a_sample_whose_parts_cost_much_more_than_it_does_runs_whole_beside_requests():
    """For the TPOT target a sample splits only where its parts cost little more than the
    whole (``PARTS_OVERHEAD``); a sample too long for an arrival splits whatever they cost."""
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                                    default_ttft_s=5.0))
    engine.submit_job(_job([40, 50], steps=5))
    count = engine.trainer.sample_parts
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True),
                       slo=SLO(ttft_s=60.0, tpot_s=0.5), admission=False)
    engine.latency.times |= {sample_part_key(64, i, count): 0.5 for i in range(count)}
    engine.latency.times |= {sample_key(64): 1.0}  # parts 3.5x the whole
    assert engine.scheduler._sample_unit() == (1.0, False)
    engine.latency.times |= {sample_key(64): 10.0}  # too long for an arrival's 5 s TTFT
    assert engine.scheduler._sample_unit() == (0.5, True)
