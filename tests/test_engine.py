"""The engine: continuous batching, chunked prefill, preemption, abort, bad input, compilation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, SamplingParams

from support import count_compilations, greedy_reference, tiny_model

# Small pages and a small budget force chunked prefill and mixed batches.
SMALL = EngineConfig.flat(page_size=4, num_pages=128, max_num_seqs=4, max_num_batched_tokens=16,
                          min_token_bucket=8, min_seq_bucket=2, max_model_len=128)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 320, size=n).tolist() for n in lengths]


def _drain(engine: Engine, ids) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
    return {i: done[i] for i in ids}


def test_greedy_matches_whole_sequence_reference():
    model = tiny_model()
    prompts = _prompts(0, [3, 17, 30, 9, 1, 25])  # more prompts than max_num_seqs
    engine = Engine(model, SMALL)
    got = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, got, strict=True):
        assert out == greedy_reference(model, prompt, 12)
    assert engine.kv_usage().used_pages == 0


def test_preemption_recomputes_and_keeps_outputs():
    model = tiny_model()
    prompts = _prompts(1, [10, 12, 9, 11])
    sampled = SamplingParams(max_tokens=14, temperature=0.8, top_k=50, seed=7, ignore_eos=True)
    greedy = SamplingParams(max_tokens=14, ignore_eos=True)
    roomy = Engine(model, SMALL)
    # 4 requests of up to 25 tokens need 7 pages each; 12 pages force preemptions.
    tight = Engine(model, SMALL.replace(num_pages=12))
    want_greedy = roomy.generate(prompts, greedy)
    want_sampled = roomy.generate(prompts, sampled)
    assert tight.generate(prompts, greedy) == want_greedy
    assert tight.num_preemptions > 0
    before = tight.num_preemptions
    assert tight.generate(prompts, sampled) == want_sampled
    assert tight.num_preemptions > before
    assert tight.kv_usage().used_pages == 0


def test_seeded_sampling_independent_of_batch():
    model = tiny_model()
    prompts = _prompts(2, [5, 8, 13])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    engine = Engine(model, SMALL)
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert together == alone
    other_seed = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 124}))
    assert other_seed != together


def test_stop_tokens_and_max_tokens():
    model = tiny_model()
    prompt = _prompts(3, [6])[0]
    ref = greedy_reference(model, prompt, 8)
    engine = Engine(model, SMALL)
    stop_at = ref[4]
    first = ref.index(stop_at)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=8, stop_token_ids=(stop_at,))),
           engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True))]
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = (out.finish_reason, out.output_token_ids)
    assert reasons[ids[0]] == ("stop", ref[:first + 1])
    assert reasons[ids[1]] == ("length", ref[:3])


def test_many_sequence_batches_match_few_sequence_batches():
    """Batches of 16 sequences take the by-token attention formulation on CPU, batches of
    at most 4 the reference's; both give the whole-sequence greedy tokens."""
    model = tiny_model()
    prompts = _prompts(5, [3, 17, 30, 9, 1, 25, 12, 6, 21, 4, 14, 8, 19, 2, 27, 10])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    wide = Engine(model, EngineConfig.flat(
        page_size=4, num_pages=256, max_num_seqs=16, max_num_batched_tokens=64,
        min_token_bucket=16, min_seq_bucket=16, max_model_len=128))
    got = wide.generate(prompts, params)
    assert got == Engine(model, SMALL).generate(prompts, params)
    for i in (0, 2):
        assert got[i] == greedy_reference(model, prompts[i], 8)


def test_abort_frees_pages_at_any_time():
    model = tiny_model()
    engine = Engine(model, SMALL)
    prompts = _prompts(4, [30, 7, 20, 9, 11])
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # the first is mid-prefill (30 tokens > 16 budget)
    assert engine.abort(ids[0])  # running, mid-prefill
    assert engine.abort(ids[4])  # still waiting
    engine.step()
    engine.step()
    assert engine.abort(ids[1])  # decoding
    assert not engine.abort(ids[1])
    assert not engine.abort("no-such-request")
    done = _drain(engine, ids[2:4])
    for i in (2, 3):
        assert done[ids[i]] == greedy_reference(model, prompts[i], 20)
    assert engine.kv_usage().used_pages == 0
    assert not engine.has_unfinished()


BAD_REQUESTS = [
    ([], {}, "prompt is empty"),
    ([5, 320, 7], {}, "outside the vocabulary"),
    ([5, -1], {}, "outside the vocabulary"),
    ([5, 1.5], {}, "not an integer"),
    (list(range(3, 120)), {"max_tokens": 20}, "beyond the model length"),
    ([5], {"temperature": -0.5}, "temperature"),
    ([5], {"temperature": math.nan}, "temperature"),
    ([5], {"top_p": 0.0}, "top_p"),
    ([5], {"top_p": math.nan}, "top_p"),
    ([5], {"top_k": -1}, "top_k"),
    ([5], {"max_tokens": 0}, "max_tokens"),
    ([5], {"seed": -3}, "seed"),
    ([5], {"stop_token_ids": (999,)}, "stop token"),
]


@pytest.mark.parametrize("prompt,sampling,message", BAD_REQUESTS)
def test_bad_input_is_refused_and_engine_keeps_serving(prompt, sampling, message):
    model = tiny_model()
    engine = _shared_small_engine()
    good = _prompts(5, [7])[0]
    good_id = engine.add_request(good, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**{"max_tokens": 4, **sampling}))
    assert _drain(engine, [good_id])[good_id] == greedy_reference(model, good, 5)


def test_request_that_can_never_fit_is_refused():
    engine = Engine(tiny_model(), SMALL.replace(num_pages=4))
    with pytest.raises(ValueError, match="KV pages"):
        engine.add_request(list(range(3, 23)), SamplingParams(max_tokens=4))
    assert not engine.has_unfinished()


_engines: dict[str, Engine] = {}


def _shared_small_engine() -> Engine:
    if "small" not in _engines:
        _engines["small"] = Engine(tiny_model(), SMALL)
    return _engines["small"]


def test_a_bucket_is_timed_after_an_untimed_run_until_enough_time_has_passed(monkeypatch):
    # The first runs after a compile read slow: one is left out, and a bucket of a few
    # milliseconds is timed until ``seconds`` have passed (the median of many), a slow one
    # ``min_repeats`` times.
    engine = _shared_small_engine()
    bucket = engine.buckets[0]
    for step_s, timed in ((0.01, 5), (1.0, 3)):
        runs = []
        monkeypatch.setattr(engine, "_run_padding",
                            lambda batch, b: runs.append(b) or step_s)  # noqa: B023
        times = engine._padding_times(None, bucket, seconds=0.045, min_repeats=3)
        assert times == [step_s] * timed and len(runs) == timed + 1


def test_no_recompilation_in_steady_state():
    model = tiny_model()
    engine = Engine(model, SMALL)
    engine.warmup(progress=False)
    rng = np.random.default_rng(6)
    steps = 0
    with count_compilations() as compiled:
        # The benchmarks' speed probe runs warmed-up buckets only (a ratio; its value is
        # the machine's, not asserted).
        assert engine.speed_probe(seconds=0.01) > 0
        while steps < 60:
            if len(engine.waiting) < 3 and rng.random() < 0.5:
                n = int(rng.integers(1, 40))
                params = SamplingParams(
                    max_tokens=int(rng.integers(1, 24)), temperature=float(rng.choice([0, 0.7])),
                    top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.8])),
                    ignore_eos=True)
                engine.add_request(rng.integers(3, 320, size=n).tolist(), params)
            if engine.has_unfinished():
                engine.step()
                steps += 1
    assert compiled["n"] == 0, compiled["events"]
    assert engine.num_steps >= 50


def test_compilation_counter_sees_compiles():
    import jax

    with count_compilations() as compiled:
        jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert compiled["n"] >= 1


def test_overlapped_loop_gives_the_synchronous_outputs():
    """Planning iteration i+1 while i runs (tokens fed on the device) changes no output:
    greedy and seeded sampling, stop tokens, max_tokens and preemption (few pages)."""
    model = tiny_model()
    prompts = _prompts(5, [3, 17, 30, 9, 1, 25, 12])

    def run(overlap: bool, stops=None) -> tuple[dict, int]:
        engine = Engine(model, SMALL.replace(overlap_host=overlap, num_pages=20))
        assert engine.overlap is overlap
        ids = [engine.add_request(p, SamplingParams(
            max_tokens=8 + i % 3, temperature=0.9 if i % 2 else 0.0, seed=i, ignore_eos=True,
            stop_token_ids=[] if stops is None else [stops[i]]), request_id=f"r{i}")
            for i, p in enumerate(prompts)]
        return _drain(engine, ids), engine.num_preemptions

    plain, preempted = run(False)
    assert preempted > 0
    assert run(True)[0] == plain
    # Each request stops on its 4th token: the overlapped loop has planned one more token
    # by then, which it drops.
    stops = [plain[f"r{i}"][3] for i in range(len(prompts))]
    stopped, _ = run(False, stops)
    assert all(len(out) <= 4 for out in stopped.values())
    assert run(True, stops)[0] == stopped
