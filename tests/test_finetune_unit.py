"""coserve's unit of finetuning while requests run (``SchedulingConfig.finetune_unit``): whole
samples funded by the slack the requests leave, token-level windows and pieces, or whichever
the latency model prices lower per token."""

from __future__ import annotations

import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, SamplingParams
from coserve_jax.finetune.data import Dataset
from coserve_jax.latency import LatencyModel, bucket_key, piece_key, sample_key
from coserve_jax.policy import BeforeFirstToken, Policy
from coserve_jax.scheduler import IterationPlan
from coserve_jax.slo import SLO

from support import greedy_reference, random_sequence, tiny_model

CONFIG = dict(page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16,
              min_token_bucket=8, min_seq_bucket=2, max_model_len=128, max_train_seqs=2,
              max_train_len=64, train_window=8, max_lora_rank=8)


def _samples_policy(**kw) -> Policy:
    policy = Policy("coserve", safety=0.9, banked_reserve=1.0, **kw)
    policy.samples_beside_inference = True
    return policy


def test_a_sample_waits_for_the_slack_credit_and_never_hoards_more_than_one():
    policy = _samples_policy()
    # Each iteration serving a 10 ms target in 5 ms leaves 0.9 * 10 - 5 = 4 ms.
    for _ in range(4):
        assert not policy.sample_fits(0.018, 0.005, [], [])
        policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010)
    assert policy.slack_credit == pytest.approx(0.016)
    assert not policy.sample_fits(0.018, 0.005, [], [])
    policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010)
    policy.cap_credit(0.018)
    assert policy.slack_credit == pytest.approx(0.018)  # capped at one sample
    assert policy.sample_fits(0.018, 0.005, [], [])
    # The sample spends what it took; the credit of a long lull is capped at one sample.
    policy.observe(0.020, had_inference=False, had_finetune=True, tpot_target=0.010)
    assert policy.slack_credit == pytest.approx(-0.002)
    for _ in range(100):
        policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010)
    policy.cap_credit(0.020)
    assert policy.slack_credit == pytest.approx(0.020)
    assert policy.sample_fits(0.020, 0.005, [], [])
    # An idle whole sample (no request was served: no target) spends no credit.
    policy.observe(0.020, had_inference=False, had_finetune=True)
    assert policy.slack_credit == pytest.approx(0.020)
    # Iterations that overran the target take credit back.
    policy.observe(0.030, had_inference=True, had_finetune=False, tpot_target=0.010)
    assert policy.slack_credit == pytest.approx(-0.001)


def test_a_credit_cap_of_several_samples_keeps_the_slack_of_a_wait():
    """``credit_cap``: what the iterations bank while a sample waits (a request could not
    absorb it) is kept up to that many samples, for the iterations after the wait."""
    policy = _samples_policy(credit_cap=3.0)
    for _ in range(20):  # 20 x 4 ms banked while the sample waits
        policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010)
        policy.cap_credit(0.018)
    assert policy.slack_credit == pytest.approx(3 * 0.018)
    for _ in range(3):  # three samples run on it (each in 17 ms), requests between them
        assert policy.sample_fits(0.018, 0.005, [], [])
        policy.observe(0.017, had_inference=False, had_finetune=True, tpot_target=0.010)
    assert policy.slack_credit == pytest.approx(0.003)
    assert not policy.sample_fits(0.018, 0.005, [], [])
    with pytest.raises(ValueError, match="sample_credit_cap"):
        EngineConfig.flat(sample_credit_cap=0.5)


def test_the_slot_headroom_caps_what_an_iteration_banks():
    """An iteration banks for whole samples only what it could have run beside its requests:
    ``safety`` times the target, or less where the sequence slots allow less."""
    policy = _samples_policy()
    policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010,
                   headroom_s=0.006)
    assert policy.slack_credit == pytest.approx(0.001)
    policy.observe(0.005, had_inference=True, had_finetune=False, tpot_target=0.010,
                   headroom_s=0.020)
    assert policy.slack_credit == pytest.approx(0.005)


def test_every_request_must_absorb_the_samples_delay():
    policy = _samples_policy()
    policy.slack_credit = 1.0
    target, step, sample = 0.010, 0.004, 0.030
    # 10 tokens after the first in 40 ms, 20 to come at 4 ms: by its last token its mean may
    # be 0.9 * 10 ms over 30 tokens = 270 ms, of which 40 + 80 are spent and 10 (one target)
    # kept back: 140 ms allowed; the sample needs 30 ms more than the steps.
    assert policy.sample_fits(sample, step, [target], [(10, 0.040, 20)])
    # Behind: 10 tokens in 150 ms; 270 - 150 - 80 - 10 = 30 ms allowed, 30 ms needed.
    assert policy.sample_fits(sample, step, [target], [(10, 0.149, 20)])
    assert not policy.sample_fits(sample, step, [target], [(10, 0.151, 20)])
    # The tightest request decides.
    assert not policy.sample_fits(sample, step, [target, target],
                                  [(10, 0.040, 20), (10, 0.160, 20)])
    # Before its first token: 0.9 of the time left to its TTFT covers the sample and its
    # prefill steps (here two more after this one: three steps).
    assert policy.sample_fits(sample, step, [target], [BeforeFirstToken(0.050, 2)])
    assert not policy.sample_fits(sample, step, [target], [BeforeFirstToken(0.045, 2)])
    # Nothing known: the sample and the next step within 0.9 of the target.
    assert not policy.sample_fits(sample, step, [target], [None])
    assert policy.sample_fits(0.004, step, [target], [None])
    # The tokens to come take what the iterations serving requests were seen to take, where
    # that is longer than the predicted step: 8 ms, so 30 + 160 ms are needed.
    policy.observe(0.008, had_inference=True, had_finetune=False, tpot_target=target)
    policy.slack_credit = 1.0
    assert policy.sample_fits(sample, step, [target], [(10, 0.065, 20)])  # 195 allowed
    assert not policy.sample_fits(sample, step, [target], [(10, 0.080, 20)])  # 180 allowed
    # No credit, no sample (an unmeasured one predicts 0 s).
    policy.slack_credit = 0.0
    assert not policy.sample_fits(0.0, step, [target], [None])
    # No window or piece runs beside inference in this unit; with nothing to serve, all do.
    assert policy.forward_tokens(finetune_iteration=False, inference_running=True,
                                 tokens_left=64, time_limit=1.0, step_seconds=lambda n: 0.0,
                                 piece_seconds=0.0) == 0
    assert policy.backward_seconds(finetune_iteration=False, inference_running=True,
                                   tokens_left=64, time_limit=1.0, step_seconds=0.0) == 0.0
    assert policy.forward_tokens(finetune_iteration=False, inference_running=False,
                                 tokens_left=64, time_limit=None, step_seconds=lambda n: 0.0,
                                 piece_seconds=0.0) == 64


def test_a_sample_an_arrival_could_not_wait_for_waits_for_a_lull():
    """A request arriving during a whole sample waits for all of it: the sample and the step
    after it must fit in ``safety`` times its TTFT target, whatever the credit and the
    requests running."""
    policy = _samples_policy()
    policy.slack_credit = 10.0
    assert policy.sample_fits(1.78, 0.01, [], [], arrival_ttft_s=2.0)  # 1.79 <= 0.9 * 2 s
    assert not policy.sample_fits(1.80, 0.01, [], [], arrival_ttft_s=2.0)
    assert policy.sample_fits(1.80, 0.01, [], [])  # no arrival to keep the TTFT of


def _job(lengths, seed=0, steps=1000):
    rng = np.random.default_rng(seed)
    return FinetuneJob("t", Dataset([random_sequence(rng, n) for n in lengths]),
                       lora=LoraConfig(r=4, lora_alpha=8), sequences_per_step=2,
                       max_steps=steps)


def test_auto_picks_the_unit_the_latency_model_prices_lower_per_token():
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG))
    scheduler = engine.scheduler
    assert engine.finetune_unit == "tokens"  # unknown costs: the default until warmup

    def times(sample_per_token: float) -> LatencyModel:
        t = {bucket_key(b): 0.001 * b.num_tokens for b in engine.buckets}
        for n in engine.trainer.seq_buckets:
            shape, _ = engine.trainer.pieces_per_sequence(n)
            t[piece_key(*shape)] = 0.001 * n
            t[sample_key(n)] = sample_per_token * n
        return LatencyModel(t)

    # A sample of the longest bucket (64 tokens) beside half a batch of decodes (2): its 14
    # forward tokens a step add (16 - 8) ms, 8/14 ms a token, and each of its pieces 64 ms,
    # 1 ms a token.
    shape, pieces = engine.trainer.pieces_per_sequence(64)
    assert shape[0] == 64 and pieces * shape[1] == engine.model.config.num_layers
    token_level = 8 / 14 * 1e-3 + pieces * 1e-3
    engine.latency = times(token_level * 0.9)
    assert scheduler.finetune_costs()["tokens"] == pytest.approx(token_level)
    assert scheduler.choose_finetune_unit() == "samples" == engine.finetune_unit
    engine.latency = times(token_level * 1.1)
    assert scheduler.choose_finetune_unit() == "tokens" == engine.finetune_unit


@pytest.mark.parametrize("tpot_s, arrival_ttft_s", [(60.0, 60.0), (1e-4, 60.0),
                                                    (60.0, 1e-4)])
def test_coserve_by_samples_interleaves_whole_samples_with_requests(tpot_s, arrival_ttft_s):
    """With the whole-sample unit, requests are served by steps without finetuning tokens, and
    whole samples run between them while the requests' slack covers them (a loose target:
    every other iteration), never when it does not (a target no step meets). A default TTFT
    target that a request arriving during any sample would miss makes every sample too long
    to run whole beside requests: they run at token level there (windows beside the
    requests, pieces after them). Either way the requests' greedy outputs are those of the
    model alone, and idle iterations run samples (those an arrival could wait for). The
    tokens of the step before a sample are handed out before the sample runs."""
    model = tiny_model()
    rng = np.random.default_rng(5)
    lengths = [40, 61, 35, 52, 47, 58]
    engine = Engine(model, EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                             default_ttft_s=arrival_ttft_s))
    assert engine.finetune_unit == "samples"
    engine.submit_job(_job(lengths))
    run = engine.trainer.jobs["t"]
    for i in range(2):  # nothing to serve: whole samples (the first one is timed)...
        engine.step()
        # ...but once timed, one too long for an arrival also runs at token level when
        # idle: at low load nearly every arrival lands in an idle iteration.
        assert engine.last_step.whole_samples == int(i == 0 or arrival_ttft_s > 1)
    assert engine.latency.predict(sample_key(64)) > 0
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in (9, 14, 6)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True),
                              slo=SLO(ttft_s=60.0, tpot_s=tpot_s), admission=False)
           for p in prompts]
    done, beside_requests = {}, 0
    while len(done) < len(ids):
        serving = bool(engine.running or engine.waiting)
        trained, samples = run.tokens_trained, engine.counters["whole_samples"]
        outputs = engine.step()
        for out in outputs:
            if out.finished:
                done[out.request_id] = out.output_token_ids
        if engine.counters["whole_samples"] > samples:
            # Tokens sampled before a whole sample went out before it ran.
            assert outputs == []
        info = engine.last_step
        fallback = arrival_ttft_s < 1
        assert fallback or (info.backward_pieces == 0 and not run.inflight)
        if info.whole_samples:
            assert info.inference_tokens == 0 and info.bucket is None
            assert run.tokens_trained - trained == info.finetune_tokens
            beside_requests += serving
        else:
            assert fallback or info.finetune_tokens == 0
    if tpot_s > 1 and not fallback:
        assert beside_requests >= 3
    else:
        assert beside_requests == 0
    # Token level beside the requests only where no sample could run whole beside them.
    assert (engine.counters["mixed_steps"] > 0) == fallback
    assert [done[i] for i in ids] == [greedy_reference(model, p, 8) for p in prompts]


def test_finetune_unit_is_checked():
    with pytest.raises(ValueError, match="finetune_unit"):
        EngineConfig.flat(finetune_unit="layers")


def test_an_idle_sample_waits_for_the_queued_work_an_arrival_could_not_also_wait_for():
    """With nothing to serve, a whole sample that an arriving request could wait for alone
    (2 s against 0.9 * 5 s) but not after the device work queued before it (3 s) leaves the
    iteration empty: the queue drains, and the next iteration runs it."""
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                                    default_ttft_s=5.0))
    engine.submit_job(_job([40, 61, 35, 52]))
    engine.latency.times |= {sample_key(n): 2.0 for n in engine.trainer.seq_buckets}
    scheduler = engine.scheduler
    assert scheduler.schedule(queued_s=3.0) == IterationPlan()
    assert scheduler.schedule(queued_s=0.0).whole_sample


def _engine_serving_one_request(prompt: list[int], sample_s: float) -> Engine:
    """An engine of the whole-sample unit with a job whose samples are priced ``sample_s``,
    and one request added with loose targets (60 s). The request may stop at EOS, so the
    scheduler counts on no more tokens to come than it has produced (a request that only
    ``max_tokens`` ends could absorb a sample over all it has left)."""
    engine = Engine(tiny_model(), EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                                    default_ttft_s=60.0))
    engine.submit_job(_job([40, 61, 35, 52]))
    engine.latency.times |= {sample_key(n): sample_s for n in engine.trainer.seq_buckets}
    engine.add_request(prompt, SamplingParams(max_tokens=8),
                       slo=SLO(ttft_s=60.0, tpot_s=60.0), admission=False)
    return engine


def test_the_credit_is_capped_while_a_sample_waits_and_kept_beyond_one_that_runs():
    """The slack credit holds at most one sample while the sample waits for the requests
    to absorb it; when it runs, what the credit held beyond its price stays banked (the
    iteration that crossed the price earned it) rather than being dropped at the cap."""
    prompt = list(range(3, 12))
    engine = _engine_serving_one_request(prompt, 0.010)
    engine.policy.slack_credit = 0.015
    assert engine.scheduler.schedule().whole_sample
    assert engine.policy.slack_credit == pytest.approx(0.015)  # not capped: the sample runs
    # Once its first token is out, the request has banked nothing against its TPOT target
    # (and keeps one target in reserve): the sample waits, and the credit is capped at it.
    engine = _engine_serving_one_request(prompt, 0.010)
    engine.step()  # its prompt, which samples its first token (no credit yet: no sample)
    assert engine.last_step.inference_tokens == len(prompt)
    assert engine.policy.slack_credit > 0.010
    assert not engine.scheduler.schedule().whole_sample
    assert engine.policy.slack_credit == pytest.approx(0.010)


def test_no_sample_unit_follows_another_while_requests_are_present():
    """A credit that covers several samples is spread over the requests' steps, not spent
    in a burst: while requests are present, a serving iteration runs between two sample
    units (the credit is kept beyond the price of the one that runs, above)."""
    engine = _engine_serving_one_request(list(range(3, 12)), 0.010)
    engine.policy.slack_credit = 0.050
    # No target held back: the request, its first token in flight after the second plan,
    # can absorb a sample at the third (with the default reserve it has banked too little).
    engine.policy.banked_reserve = 0.0
    plans = [engine.scheduler.schedule() for _ in range(3)]
    assert [p.whole_sample for p in plans] == [True, False, True]
    assert plans[1].rows  # the request's prompt runs between the two samples


def test_only_samples_too_long_to_run_whole_beside_requests_fall_back_to_token_level():
    """With the whole-sample unit, a sample whose whole program a request arriving meanwhile
    could not wait for (here: priced at 10 s against a 5 s default TTFT) runs at token level
    beside the requests; shorter ones still run whole, also while a long one is in flight at
    token level."""
    model = tiny_model()
    engine = Engine(model, EngineConfig.flat(**CONFIG, finetune_unit="samples",
                                             default_ttft_s=5.0))
    engine.submit_job(_job([10, 12, 40, 20, 9, 14, 50, 11, 13, 15], steps=5))
    run = engine.trainer.jobs["t"]
    for _ in range(2):  # compile the sample program
        engine.step()
    engine.latency.times |= {sample_key(16): 0.01, sample_key(32): 0.01, sample_key(64): 10.0}
    rng = np.random.default_rng(3)
    # Three requests: the batch's fourth sequence row is free for a training window.
    prompts = [rng.integers(3, 259, size=n).tolist() for n in (9, 14, 6)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True),
                              slo=SLO(ttft_s=60.0, tpot_s=60.0), admission=False)
           for p in prompts]
    done, whole, token_level, whole_beside_token_level = {}, [], set(), 0
    while len(done) < len(ids):
        serving = bool(engine.running or engine.waiting)
        inflight = bool(run.inflight)
        outputs = engine.step()
        done |= {o.request_id: o.output_token_ids for o in outputs if o.finished}
        info = engine.last_step
        if serving and info.whole_samples:
            whole.append(info.finetune_tokens)
            whole_beside_token_level += inflight
        token_level |= {id(f) for f in run.inflight}
        assert all(f.length > 32 for f in run.inflight)  # bucket 64 only
    assert whole and all(n <= 32 for n in whole) and whole_beside_token_level
    assert token_level and engine.counters["mixed_steps"] > 0
    # (The outputs are those of the model alone: the test above checks it.)
    assert all(len(done[i]) == 24 for i in ids)
