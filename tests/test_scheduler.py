"""The hybrid token scheduler's policy, proven on the engine (not by timings)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from coserve_jax import (
    DataConfig,
    Engine,
    EngineConfig,
    FinetuneJob,
    LoraConfig,
    SamplingParams,
    from_records,
)
from coserve_jax.batch import loss_head_rows, loss_row_sizes
from coserve_jax.finetune.data import synthetic_task
from coserve_jax.latency import (
    LatencyModel,
    bucket_key,
    loss_head_key,
    piece_key,
    sample_key,
    vocab_sort_key,
)
from coserve_jax.policy import BeforeFirstToken, Policy, parse_mode
from coserve_jax.slo import SLO, AdmissionError

from support import count_compilations, greedy_reference, tiny_model

BASE = dict(page_size=8, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64,
            min_token_bucket=16, min_seq_bucket=4, max_model_len=128, max_lora_rank=8,
            max_train_seqs=4, max_train_len=64, train_window=16, backward_layers=2,
            backward_pieces_per_step=2, default_tpot_s=1.0)


def _engine(**overrides) -> Engine:
    return Engine(tiny_model(), EngineConfig.flat(**{**BASE, **overrides}))


def _job(name="ft", steps=1000):
    data = from_records(synthetic_task("copy", 32, seed=0), tiny_model().tokenizer,
                        DataConfig(max_seq_len=64))
    return FinetuneJob(name, data, lora=LoraConfig(r=4, lora_alpha=8), max_steps=steps,
                       sequences_per_step=4)


def _prompts(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, size=int(k)).tolist() for k in rng.integers(lo, hi, n)]


def _steps_with_latency(engine: Engine, times: dict[str, float]) -> None:
    """Replaces the measured latency model with a fixed, synthetic one (no timing noise)."""
    engine.latency = LatencyModel(times, smoothing=0.0)


def _synthetic_times(engine: Engine, per_token: float, piece: float) -> dict[str, float]:
    times = {bucket_key(b): per_token * b.num_tokens for b in engine.buckets}
    for n in engine.trainer.seq_buckets:
        times[piece_key(n, engine.config.finetune.backward_layers)] = piece
    return times


def test_parse_mode():
    assert parse_mode("temporal:16") == ("temporal", 16)
    assert parse_mode("temporal:dynamic") == ("temporal", None)
    with pytest.raises(ValueError, match="mode"):
        parse_mode("temporal:0")
    with pytest.raises(ValueError, match="mode"):
        EngineConfig.flat(mode="both")


def test_policy_picks_largest_budget_within_limit():
    policy = Policy("coserve", safety=1.0)
    # 1 ms per token; 40 ms available; a ready piece takes 4 ms: at most 36 ms of step.
    n = policy.forward_tokens(finetune_iteration=False, inference_running=True, tokens_left=60,
                              time_limit=0.040, step_seconds=lambda k: 0.001 * (8 + k),
                              piece_seconds=0.004)
    assert n == 16  # 8 + 16 tokens = 24 ms fits; 8 + 32 = 40 ms does not
    assert policy.backward_seconds(finetune_iteration=False, inference_running=True,
                                   tokens_left=44, time_limit=0.040,
                                   step_seconds=0.024) == pytest.approx(0.016)
    assert policy.backward_seconds(finetune_iteration=False, inference_running=True,
                                   tokens_left=0, time_limit=0.040, step_seconds=0.024) == 0
    assert policy.backward_seconds(finetune_iteration=False, inference_running=False,
                                   tokens_left=60, time_limit=None, step_seconds=0.5) == math.inf
    assert policy.forward_tokens(finetune_iteration=False, inference_running=False,
                                 tokens_left=60, time_limit=None, step_seconds=lambda k: 1.0,
                                 piece_seconds=1.0) == 60


def test_an_iteration_serving_no_request_is_bounded_by_an_arrivals_ttft():
    policy = Policy("coserve", safety=0.9)
    # A request arriving now waits for this iteration and its own first step (0.3 s).
    assert policy.idle_limit(2.0, 0.3) == pytest.approx(1.5)
    assert policy.idle_limit(None, 0.3) is None
    assert Policy("temporal:4").idle_limit(2.0, 0.3) is None
    assert policy.sample_too_long(1.6, 0.3, 2.0) and not policy.sample_too_long(1.4, 0.3, 2.0)
    # ...and for the device work queued before it.
    assert policy.idle_limit(2.0, 0.3, queued_s=0.5) == pytest.approx(1.0)
    assert policy.sample_too_long(1.4, 0.3, 2.0, queued_s=0.5)
    step = lambda k: 0.001 * k  # noqa: E731  (no inference: no step without tokens)
    idle = dict(finetune_iteration=False, inference_running=False, tokens_left=64,
                step_seconds=step, candidates=[16, 32, 64])
    assert policy.forward_tokens(time_limit=0.040, piece_seconds=0.0, **idle) == 32
    assert policy.forward_tokens(time_limit=0.040, piece_seconds=0.010, **idle) == 16
    # Nothing fits: the smallest window runs, unless a piece is ready (it runs instead).
    assert policy.forward_tokens(time_limit=0.005, piece_seconds=0.0, **idle) == 16
    assert policy.forward_tokens(time_limit=0.005, piece_seconds=0.0, piece_ready=True,
                                 **idle) == 0
    # ...and the piece runs whether it fits or not; where one fits, the time left bounds it.
    no_window = dict(finetune_iteration=False, inference_running=False, tokens_left=64,
                     step_seconds=0.0)
    assert policy.backward_seconds(time_limit=0.005, stall_piece_s=0.010,
                                   **no_window) == pytest.approx(0.010)
    assert policy.backward_seconds(time_limit=0.040, stall_piece_s=0.010,
                                   **no_window) == pytest.approx(0.040)


@pytest.mark.parametrize("ttft_s", [0.05, 0.005])
def test_finetuning_with_nothing_to_serve_fits_an_arrivals_ttft_and_never_stalls(ttft_s):
    # Synthetic step times: 1 ms per token of the bucket, 4 ms per piece. An arrival may
    # wait 0.9 * ttft_s: 45 ms (a 32-token step and two pieces fit, a 64-token one does
    # not), or 4.5 ms (nothing fits: one unit of finetuning per iteration, and the job
    # still finishes).
    engine = _engine(mode="coserve", default_ttft_s=ttft_s)
    engine.submit_job(_job(steps=1))
    times = _synthetic_times(engine, per_token=0.001, piece=0.004)
    _steps_with_latency(engine, times)
    run = engine.trainer.jobs["ft"]
    for _ in range(200):
        if run.step:
            break
        engine.step()
        s = engine.last_step
        assert s.finetune_tokens or s.backward_pieces
        predicted = ((times[bucket_key(s.bucket)] if s.bucket else 0.0)
                     + 0.004 * s.backward_pieces)
        if ttft_s == 0.05:
            assert predicted <= 0.9 * ttft_s + 1e-9, s
        else:
            assert bool(s.finetune_tokens) + s.backward_pieces == 1, s
            assert s.bucket is None or s.bucket.num_tokens == 16, s  # the smallest
    assert run.step == 1


def test_iteration_limit_is_the_tightest_target():
    policy = Policy("coserve", safety=0.9)
    assert policy.iteration_limit([0.04, 0.1]) == pytest.approx(0.036)
    assert policy.iteration_limit([]) is None


def test_temporal_period_and_dynamic_period():
    policy = Policy("temporal:4")
    picks = [policy.finetune_iteration(True, True, 0.1) for _ in range(12)]
    assert picks == [False, False, False, True] * 3
    assert Policy("temporal:4").finetune_iteration(False, True, None)  # idle: finetune
    dynamic = Policy("temporal:dynamic", safety=1.0)
    for _ in range(5):
        dynamic.observe(0.010, had_inference=True, had_finetune=False)
        dynamic.observe(0.090, had_inference=False, had_finetune=True)
    # A 90 ms finetuning iteration amortised over inference iterations with 20 ms of slack
    # each: 5 of them, so every 6th iteration finetunes (mean 10 + 90/5 = 28 ms <= 30).
    assert dynamic._dynamic_period(0.030) == 6


def test_inference_is_never_displaced_by_finetuning():
    prompts = _prompts(12, 5, 60)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    counts = {}
    for mode in ("inference-only", "coserve"):
        engine = _engine(mode=mode)
        if mode == "coserve":
            engine.submit_job(_job())
        ids = [engine.add_request(p, params) for p in prompts]
        done, trace = {}, []
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.output_token_ids
            trace.append(engine.last_step.inference_tokens)
        counts[mode] = trace
        if mode == "coserve":
            assert engine.counters["mixed_steps"] > 0
            assert [done[i] for i in ids[:3]] == [greedy_reference(tiny_model(), p, 10)
                                                  for p in prompts[:3]]
    assert counts["coserve"] == counts["inference-only"]


def test_burst_squeezes_finetuning_to_zero_then_it_returns():
    # Synthetic step times; banked slack would mix in the wall clock of this machine. Prefill
    # chunks take all the token budget left (sized to the SLO, the burst would not fill it).
    engine = _engine(mode="coserve", spend_banked_slack=False, slo_prefill_chunks=False)
    engine.submit_job(_job())
    _steps_with_latency(engine, _synthetic_times(engine, per_token=0.001, piece=0.002))
    tight = SLO(ttft_s=10.0, tpot_s=0.040)  # 36 ms usable: about 34 tokens and a piece
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), slo=tight)
    calm = []
    for _ in range(6):
        engine.step()
        calm.append(engine.last_step)
    # Every calm iteration carries finetuning work beside the decode token.
    assert all(s.inference_tokens == 1 and (s.finetune_tokens or s.backward_pieces)
               for s in calm[1:])
    assert any(s.finetune_tokens > 0 for s in calm)
    # A burst of long prompts fills the whole 64-token budget.
    for p in _prompts(6, 40, 60, seed=1):
        engine.add_request(p, SamplingParams(max_tokens=2, ignore_eos=True), slo=tight)
    engine.step()
    burst = engine.last_step
    assert burst.inference_tokens == 64 and burst.finetune_tokens == 0
    assert burst.backward_pieces == 0
    while engine.waiting or len(engine.running) > 1:
        engine.step()
    engine.step()
    after = engine.last_step
    assert after.inference_tokens == 1 and (after.finetune_tokens or after.backward_pieces)


def test_finetuning_yields_pages_before_inference_is_preempted():
    # 12 pages of 8 tokens: a training sequence's forward holds some of them.
    engine = _engine(num_pages=12, train_window=8)
    engine.submit_job(_job())
    for _ in range(3):
        engine.step()
    assert engine.kv_usage().used_pages > 0  # training windows hold pages
    prompt = _prompts(1, 60, 61)[0]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    out = {}
    while rid not in out:
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.output_token_ids
    assert engine.counters["finetune_yields"] > 0
    assert engine.num_preemptions == 0
    assert out[rid] == greedy_reference(tiny_model(), prompt, 20)


@pytest.mark.parametrize("unit", ["tokens", "samples"])
def test_nothing_finetunes_beside_inference_while_requests_wait_for_a_slot(unit):
    # A loose TPOT target (1 s): without the rule, pieces and whole samples would fit. The
    # slot headroom, which bounds finetuning before the slots fill, is off: this is the
    # rule for full slots alone (the headroom's tests are in test_scheduler_core).
    engine = _engine(mode="coserve", finetune_unit=unit, max_num_seqs=4, slot_headroom=False)
    engine.warmup(progress=False)
    engine.submit_job(_job())
    for _ in range(4):  # finetuning alone: sequences in flight, backward pieces ready
        engine.step()
    prompts = _prompts(7, 5, 20)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    queued, free, done = [], [], {}
    while engine.running or engine.waiting:
        serving = bool(engine.running)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
        # Requests still waiting after the step waited when it was planned (only a slot,
        # not tokens or pages, is short here), and when the sample it ran was planned.
        if engine.waiting:
            queued.append(engine.last_step)
        elif serving:
            free.append(engine.last_step)
    assert len(queued) >= 20 and engine.counters["slot_waits"] >= 20
    assert all(s.finetune_tokens == 0 and s.backward_pieces == 0 and s.whole_samples == 0
               for s in queued)
    # Once a slot is free, finetuning runs beside the requests again.
    assert any(s.backward_pieces or s.whole_samples for s in free)
    assert [done[i] for i in ids[:2]] == [greedy_reference(tiny_model(), p, 40)
                                          for p in prompts[:2]]


def test_admission_refuses_with_a_reason():
    engine = _engine(max_waiting=2)
    params = SamplingParams(max_tokens=4)
    engine.add_request([5, 6], params)
    engine.add_request([5, 6], params)
    with pytest.raises(AdmissionError, match="queue full"):
        engine.add_request([5, 6], params)

    slow = _engine()
    _steps_with_latency(slow, _synthetic_times(slow, per_token=0.01, piece=0.01))
    slow.add_request(list(range(3, 100)), params)  # ~2 iterations of 0.64 s queued
    with pytest.raises(AdmissionError, match="TTFT target of 1s"):
        slow.add_request(list(range(3, 100)), params, slo=SLO(ttft_s=1.0, tpot_s=1.0))
    slow.add_request([5, 6], params, slo=SLO(ttft_s=10.0, tpot_s=1.0))

    # A short prompt is priced at the step it will run in, not at the largest one.
    idle = _engine()
    times = _synthetic_times(idle, per_token=0.01, piece=0.01)
    largest = next(b for b in reversed(idle.buckets) if not b.train)
    times[bucket_key(largest)] = 100.0
    _steps_with_latency(idle, times)
    idle.add_request([5, 6, 7], params, slo=SLO(ttft_s=1.0, tpot_s=1.0))

    with pytest.raises(AdmissionError, match="serves no inference"):
        _engine(mode="finetune-only").add_request([5], params)


def test_steps_that_sample_at_temperature_are_priced_with_the_vocabulary_sort():
    """Bucket times are those of all-greedy steps (which skip the sort); a step with a row at
    temperature > 0 is priced with its rows' sort on top, in plans and in admission, and its
    observed time is folded into the bucket less that sort."""
    sort_s = 5.0
    engine = _engine(mode="inference-only", overlap_host=False)
    times = _synthetic_times(engine, per_token=0.001, piece=0.001)
    times |= {vocab_sort_key(b.num_seqs): sort_s for b in engine.buckets}
    _steps_with_latency(engine, times)
    observed = []
    observe = engine.latency.observe
    engine.latency.observe = lambda key, s: (observed.append((key, s)), observe(key, s))
    slo = SLO(ttft_s=1.0, tpot_s=60.0)
    for temperature in (0.0, 1.0):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=temperature,
                                                     ignore_eos=True),
                           slo=slo, admission=False)
        plan = engine.scheduler.schedule()
        engine.scheduler.update(plan, np.zeros(plan.bucket.num_seqs, np.int32))
        bucket_s = engine.latency.predict(bucket_key(plan.bucket))
        assert plan.sorts_vocab == (temperature > 0)
        assert engine.scheduler.predicted_step_seconds(plan) == pytest.approx(
            bucket_s + (sort_s if temperature > 0 else 0.0))
    engine.scheduler.abort("0")
    engine.scheduler.abort("1")
    # Admission: the sort alone is beyond a 1 s TTFT target; a greedy prompt is admitted.
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), slo=slo)
    with pytest.raises(AdmissionError, match="TTFT target of 1s"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0.7), slo=slo)
    engine.scheduler.abort("2")
    # A sampling step's observed time is folded in less the sort's 5 s; a greedy one's whole.
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=1.0, seed=0))
    assert observed and all(-sort_s < s < 0 for _, s in observed)
    observed.clear()
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert observed and all(s > 0 for _, s in observed)


def test_training_steps_are_priced_with_the_loss_head_of_their_rows():
    """A training bucket's time is that of a step with no rows carrying a loss; a plan with
    finetuning windows is priced with the loss head of its rows on top (the smallest compiled
    row count holding them), and its observed time is folded in less that head."""
    engine = _engine(mode="finetune-only", overlap_host=False)
    engine.submit_job(_job())
    sizes = {rows for b in engine.buckets if b.train for rows in loss_row_sizes(b.num_tokens)}
    head_s = {rows: 5.0 + rows for rows in sizes - {0}}
    times = _synthetic_times(engine, per_token=0.001, piece=0.001)
    _steps_with_latency(engine, times | {loss_head_key(r): s for r, s in head_s.items()})
    plans, observed = [], []
    schedule, observe = engine.scheduler.schedule, engine.latency.observe
    engine.scheduler.schedule = lambda *a, **k: plans.append(schedule(*a, **k)) or plans[-1]
    engine.latency.observe = lambda key, s: (observed.append((key, s)), observe(key, s))
    for _ in range(6):
        engine.step()
    training = [p for p in plans if p.windows]
    assert training
    for plan in training:
        rows = plan.loss_rows
        assert 0 < rows == sum(int((c.loss_weights > 0).sum()) for _, c in plan.windows)
        head = head_s[loss_head_rows(rows, plan.bucket.num_tokens)]
        assert engine.scheduler.predicted_step_seconds(plan) == pytest.approx(
            times[bucket_key(plan.bucket)] + head)
    # Observed steps (well under a second here) are folded in less their head (9 s or more).
    steps = [s for key, s in observed if key.endswith("-train")]
    assert steps and all(s < 0 for s in steps)


def test_finished_requests_record_slo_attainment():
    engine = _engine(mode="inference-only")
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True),
                       slo=SLO(ttft_s=60.0, tpot_s=60.0))
    # An impossible TTFT target (admission would refuse it, so it is bypassed here).
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True),
                       slo=SLO(ttft_s=1e-9, tpot_s=60.0), admission=False)
    metrics = []
    while engine.has_unfinished():
        metrics += [o.metrics for o in engine.step() if o.finished]
    assert [m.slo_attained for m in metrics] == [True, False]
    assert all(m.ttft_s > 0 and m.num_output_tokens == 5 for m in metrics)
    assert list(engine.finished) == metrics


def test_latency_model_is_saved_and_reused(tmp_path):
    engine = _engine(latency_model_dir=str(tmp_path))
    engine.warmup(progress=False)
    assert os.path.isfile(engine.latency_path)
    measured = dict(engine.latency.times)
    # The sort's extra time by rows and the loss head's by row count (0 where it is lost in
    # noise): the small vocabulary of the tiny model makes both cheap.
    extras = {vocab_sort_key(b.num_seqs) for b in engine.buckets}
    extras |= {loss_head_key(r) for b in engine.buckets if b.train
               for r in loss_row_sizes(b.num_tokens)[1:]}
    assert extras <= set(measured)
    assert all(measured[k] >= 0 for k in extras)
    assert all(v > 0 for k, v in measured.items() if k not in extras)
    assert {bucket_key(b) for b in engine.buckets} <= set(measured)
    # finetune_unit "auto" prices whole samples too, and has chosen a unit.
    assert {sample_key(n) for n in engine.trainer.seq_buckets} <= set(measured)
    assert engine.scheduler.finetune_costs() is not None
    again = _engine(latency_model_dir=str(tmp_path))
    assert again.latency.times == measured  # loaded, not re-measured
    other = _engine(latency_model_dir=str(tmp_path), max_num_batched_tokens=32)
    assert other.latency.times == {}  # another config, another file


def test_warmup_skips_the_shapes_an_earlier_engine_ran(tmp_path):
    first = _engine(latency_model_dir=str(tmp_path))
    first.warmup(progress=False)
    # Same programs, same state shapes: every shape is compiled, and the latency model is
    # loaded, so warmup runs nothing.
    again = _engine(latency_model_dir=str(tmp_path))
    assert again.runner.shapes_run is first.runner.shapes_run
    ran = []
    execute = again.runner.execute
    again.runner.execute = lambda command: ran.append(command) or execute(command)
    again.warmup(progress=False)
    assert ran == []
    keys = {bucket_key(b) for b in again.buckets}
    keys |= {sample_key(n) for n in again.trainer.seq_buckets}
    assert keys <= again.runner.shapes_run
    # ... and they are compiled indeed: serving and finetuning compile nothing.
    again.runner.execute = execute
    again.submit_job(_job())  # compiles the job's optimizer update
    with count_compilations() as compiled:
        again.generate(_prompts(3, 5, 40), SamplingParams(max_tokens=6, ignore_eos=True))
        for _ in range(20):
            again.step()
    assert compiled["n"] == 0, compiled["events"]
    # Other state shapes (more KV pages) are other compilations, recorded apart.
    other = _engine(latency_model_dir=str(tmp_path), num_pages=BASE["num_pages"] * 2)
    assert other.runner.shapes_run is not first.runner.shapes_run


@pytest.mark.parametrize("unit", ["tokens", "samples"])
def test_coserving_never_recompiles_in_steady_state(unit):
    engine = _engine(mode="coserve", finetune_unit=unit)
    engine.warmup(progress=False)
    engine.submit_job(_job())  # compiles the job's optimizer update
    run = engine.trainer.jobs["ft"]
    rng = np.random.default_rng(3)
    with count_compilations() as compiled:
        while run.step < 1:  # the first update must not compile mid-serving
            engine.step()
        for i in range(60):
            if i % 3 == 0:
                engine.add_request(rng.integers(3, 259, size=int(rng.integers(2, 50))).tolist(),
                                   SamplingParams(max_tokens=int(rng.integers(1, 12)),
                                                  ignore_eos=True))
            engine.step()
    assert compiled["n"] == 0, compiled["events"]
    assert run.step > 1
    if unit == "tokens":
        assert engine.counters["mixed_steps"] > 10
    else:
        assert engine.counters["whole_samples"] > 4 and engine.counters["mixed_steps"] == 0


def test_policy_prices_the_candidates_it_is_given():
    policy = Policy("coserve", safety=1.0)
    # Buckets of 16/32/64 tokens with 10 inference tokens: budgets 6, 22 and 54 fill them.
    cost = {16: 0.010, 32: 0.020, 64: 0.050}

    def step(n):
        return cost[next(t for t in sorted(cost) if t >= 10 + n)]

    n = policy.forward_tokens(finetune_iteration=False, inference_running=True, tokens_left=54,
                              time_limit=0.030, step_seconds=step, piece_seconds=0.0,
                              candidates=[6, 22, 54])
    assert n == 22  # fills the 32-token bucket; a power of two (16) would waste 6 tokens


def test_a_piece_that_never_fits_does_not_block_forward_windows():
    policy = Policy("coserve", safety=1.0)
    step = lambda k: 0.001 * (8 + k)  # noqa: E731
    # A 40 ms piece cannot run beside 8 ms of inference within 40 ms: it reserves nothing.
    n = policy.forward_tokens(finetune_iteration=False, inference_running=True, tokens_left=60,
                              time_limit=0.040, step_seconds=step, piece_seconds=0.040)
    assert n == 32
    assert policy.backward_seconds(finetune_iteration=False, inference_running=True,
                                   tokens_left=28, time_limit=0.040, step_seconds=step(n)) == 0


def test_proposed_windows_are_the_windows_committed():
    """Proposing windows (what the scheduler prices) changes nothing; committing a proposal
    runs exactly it."""
    engine = _engine()
    engine.submit_job(_job())
    trainer = engine.trainer
    for budget in (16, 40, 64, 5, 64, 64, 33):
        proposal = trainer.propose_windows(budget, 8)
        assert trainer.propose_windows(budget, 8) == proposal, budget
        windows = trainer.commit_windows(proposal)
        assert [(w.start, w.n, w.pages) for w in proposal] == [
            (c.start_position, len(c.token_ids), len(c.page_table)) for _, c in windows]
        assert sum(w.n for w in proposal) <= budget


def test_iteration_limit_spends_what_fast_requests_banked():
    policy = Policy("coserve", safety=0.9, banked_reserve=0.0)  # lends all it banked
    # 10 tokens after the first in 0.1 s against 40 ms: 0.26 s banked, 0.296 s allowed;
    # a request 20 ms past its first token with no second allows only 16 ms; the
    # tightest request decides; a request before its first token allows 36 ms.
    assert policy.iteration_limit([0.04], [(10, 0.1)]) == pytest.approx(0.296)
    assert policy.iteration_limit([0.04, 0.04], [(10, 0.1), (0, 0.02)]) == pytest.approx(0.016)
    assert policy.iteration_limit([0.04, 0.04], [(10, 0.1), None]) == pytest.approx(0.036)
    strict = Policy("coserve", safety=0.9, spend_banked=False)
    assert strict.iteration_limit([0.04], [(10, 0.1)]) == pytest.approx(0.036)
    # Keeping a reserve of 2 targets (80 ms) of the 0.26 s banked: 0.216 s allowed. One
    # that banked less than its reserve lends nothing; one behind still gives back its lack.
    keeps = Policy("coserve", safety=0.9, banked_reserve=2.0)
    assert keeps.iteration_limit([0.04], [(10, 0.1)]) == pytest.approx(0.216)
    assert keeps.iteration_limit([0.04], [(2, 0.05)]) == pytest.approx(0.036)
    assert keeps.iteration_limit([0.04], [(1, 0.05)]) == pytest.approx(0.022)


def test_a_request_behind_makes_up_its_lack_over_the_tokens_to_come():
    policy = Policy("coserve", safety=0.9)
    # 4 tokens after the first in 0.204 s against 40 ms: 60 ms behind 0.9 x 40 ms a token.
    # With this token the last, all of it now: 36 - 60 ms; with 4 to come, 15 ms each.
    assert policy.iteration_limit([0.04], [(4, 0.204, 1)]) == pytest.approx(-0.024)
    assert policy.iteration_limit([0.04], [(4, 0.204, 4)]) == pytest.approx(0.021)
    # Without the tokens to come (or none left), all of it in this iteration.
    assert policy.iteration_limit([0.04], [(4, 0.204)]) == pytest.approx(-0.024)
    assert policy.iteration_limit([0.04], [(4, 0.204, 0)]) == pytest.approx(-0.024)
    # Ahead, the tokens to come change nothing: it lends what it banked beyond its reserve.
    assert policy.iteration_limit([0.04], [(10, 0.1, 5)]) == pytest.approx(0.256)
    # Without the margins (what prefill may take): a safety of 1 and no reserve.
    assert policy.iteration_limit([0.04], [(10, 0.1, 5)], margins=False) == pytest.approx(0.34)
    assert policy.iteration_limit([0.04], [(4, 0.204, 4)], margins=False) == pytest.approx(
        0.04 + (0.16 - 0.204) / 4)


def test_prefilling_requests_allow_their_ttft_slack():
    policy = Policy("coserve", safety=0.9)
    # Before its first token a request's TPOT clock has not started: its TTFT binds, shared
    # by this iteration and the prefill iterations after it.
    assert policy.iteration_limit([0.04], [BeforeFirstToken(2.0, 1)]) == pytest.approx(0.9)
    assert policy.iteration_limit([0.04], [BeforeFirstToken(2.0, 4)]) == pytest.approx(0.36)
    # One whose first token this iteration samples: what runs after the step delays its
    # second token, so it allows a normal iteration only.
    assert policy.iteration_limit([0.04], [BeforeFirstToken(2.0, 0)]) == pytest.approx(0.036)
    # A missed (or nearly missed) TTFT never allows less than a normal iteration.
    assert policy.iteration_limit([0.04], [BeforeFirstToken(-1.0, 1)]) == pytest.approx(0.036)
    # The tightest request still decides: one that just produced its first token banks 0.
    assert policy.iteration_limit([0.04, 0.04], [BeforeFirstToken(2.0, 1), (0, 0.0)]) == (
        pytest.approx(0.036))
    off = Policy("coserve", safety=0.9, spend_banked=False)
    assert off.iteration_limit([0.04], [BeforeFirstToken(2.0, 1)]) == pytest.approx(0.036)


def test_a_shorter_ready_piece_runs_when_the_furthest_one_does_not_fit():
    engine = _engine(mode="finetune-only", backward_pieces_per_step=1, train_window=64)
    records = [{"text": "x" * 50}, {"text": "y" * 8}]
    data = from_records(records, tiny_model().tokenizer, DataConfig(max_seq_len=64))
    engine.submit_job(FinetuneJob("two", data, lora=LoraConfig(r=4, lora_alpha=8),
                                  sequences_per_step=2, max_steps=1))
    engine.step()  # both forwards (58 tokens) in one step, then one piece
    trainer = engine.trainer
    ready = sorted(trainer._ready_pieces(), key=lambda f: f.layers_left)
    assert len(ready) == 2 and engine.counters["backward_pieces"] == 1
    furthest, other = ready
    big = trainer._piece_shape(furthest)
    assert trainer.next_piece_shape() == big
    small = trainer.next_piece_shape(lambda shape: shape != big)
    assert small == trainer._piece_shape(other) != big
    assert trainer.next_piece_shape(lambda shape: False) is None
    left = other.layers_left
    assert trainer.run_backward_piece(lambda shape: shape != big)
    assert other.layers_left == left - engine.config.finetune.backward_layers
    assert not trainer.run_backward_piece(lambda shape: False)


def test_overlapped_loop_reprices_backward_pieces_online():
    # The overlapped loop never waits for a backward piece, so pieces are timed from the
    # span between two steps' ends that the host waited for. Pieces priced a million times
    # too cheap (a latency model measured on another machine) must be re-priced.
    engine = _engine(mode="coserve", overlap_host=True)
    engine.submit_job(_job())
    keys = [piece_key(n, engine.config.finetune.backward_layers)
            for n in engine.trainer.seq_buckets]
    engine.latency.times.update(dict.fromkeys(keys, 1e-9))
    for p in _prompts(4, 5, 20):
        engine.add_request(p, SamplingParams(max_tokens=60, ignore_eos=True))
    pieces = 0
    for _ in range(60):
        engine.step()
        pieces += engine.last_step.backward_pieces
    assert pieces > 0
    repriced = [k for k in keys if engine.latency.predict(k) > 1e-5]
    assert repriced, {k: engine.latency.predict(k) for k in keys}


def test_iterations_without_a_step_leave_no_backward_pieces_queued():
    # The overlapped loop queues pieces behind a step and waits for them only at the next
    # step; an iteration with no step of its own runs them timed, or a run of such
    # iterations would pile pieces up on the device for the next arrival to wait behind.
    # A TTFT target no iteration meets: with nothing to serve, each runs one unit of
    # finetuning, a piece alone whenever one is ready.
    engine = _engine(mode="coserve", overlap_host=True, default_ttft_s=1e-3)
    engine.submit_job(_job())
    _steps_with_latency(engine, _synthetic_times(engine, per_token=0.001, piece=0.004))
    schedule, queued = engine.scheduler.schedule, []

    def recording(queued_s: float = 0.0):
        queued.append(queued_s)
        return schedule(queued_s)

    engine.scheduler.schedule = recording
    pieces_only = []
    for i in range(40):
        engine.step()
        if engine.last_step.bucket is None and engine.last_step.backward_pieces:
            pieces_only.append(i)
    engine.step()
    assert pieces_only
    assert all(queued[i + 1] == 0.0 for i in pieces_only), [queued[i + 1] for i in pieces_only]
    assert any(q > 0 for q in queued)  # (steps still overlap their pieces)


def test_finishing_sequences_and_optimizer_steps_never_wait_for_the_device(monkeypatch):
    # A sequence's loss is a sum of its windows' device values; the overlapped loop has the
    # next step queued behind the last of them, so the loop must never wait to read one.
    # Here the device never seems to finish: the loop must still run the job to its end,
    # and the losses are read when asked.
    from coserve_jax.finetune.trainer import PendingLoss

    reads = []
    value = PendingLoss.value
    monkeypatch.setattr(PendingLoss, "ready", lambda self: False)
    monkeypatch.setattr(PendingLoss, "value", lambda self: reads.append(1) or value(self))
    engine = _engine(mode="coserve", overlap_host=True)
    engine.submit_job(_job(steps=3))
    for p in _prompts(2, 5, 20):
        engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True))
    run = engine.trainer.jobs["ft"]
    for _ in range(400):
        if run.state != "running":
            break
        engine.step()
    assert run.state == "completed" and run.step == 3
    assert not reads
    losses = run.losses
    assert len(reads) == 3
    assert len(losses) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in losses)
