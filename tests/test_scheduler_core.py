"""The scheduler alone, with no model, no runner and no device: plans, pages, preemption,
outputs matched by request id, and iterations planned while the previous one is in flight."""

from __future__ import annotations

import time

import numpy as np
import pytest

from coserve_jax import policy as policy_module
from coserve_jax.batch import Bucket
from coserve_jax.kv_cache import PageAllocator
from coserve_jax.latency import LatencyModel, bucket_key
from coserve_jax.policy import BeforeFirstToken, Policy, occupancy_aim
from coserve_jax.sampling import SamplingParams
from coserve_jax.scheduler import IterationPlan, Request, Scheduler
from coserve_jax.slo import SLO

EOS = 2


def _scheduler(num_pages: int = 64, max_num_seqs: int = 4, budget: int = 16) -> Scheduler:
    buckets = tuple(Bucket(t, s, w) for t in (8, 16) for s in (2, 4) for w in (4, 8)
                    if s <= t and t <= budget and s <= max_num_seqs)
    return Scheduler(buckets=buckets, page_size=4, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_pages_per_seq=8, max_waiting=100,
                     admission_control=False,
                     allocator=PageAllocator(num_pages, 4, 8), latency=LatencyModel(),
                     policy=Policy("inference-only"), eos_token_ids=(EOS,))


def _add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int, **params) -> Request:
    req = Request(rid, list(range(10, 10 + prompt_len)),
                  SamplingParams(max_tokens=max_tokens, **params), seed=0,
                  arrival_index=next(s.arrivals), arrival_time=0.0, slo=SLO(10.0, 1.0))
    s.add(req)
    return req


def _sample(plan: IterationPlan, token_of) -> np.ndarray:
    """A step's samples, as a device would draw them: row i gets ``token_of(request_id,
    tokens the request sampled before)`` (the batch's ``sample_counts``, which count the
    tokens in flight too)."""
    return np.array([token_of(row.request.request_id, int(plan.batch.sample_counts[i]))
                     for i, row in enumerate(plan.rows)], np.int32)


def _run(s: Scheduler, token_of, overlap: bool) -> tuple[dict[str, list[int]], list]:
    """Drives schedule/update to the end, with updates one iteration late when
    ``overlap``; returns each request's output and every plan."""
    outputs: dict[str, list[int]] = {}
    plans, pending = [], None
    while s.has_requests() or pending is not None:
        plan = s.schedule()
        plans.append(plan)
        launched = (plan, _sample(plan, token_of)) if plan.batch is not None else None
        if not overlap:
            pending, launched = launched, None
        if pending is not None:
            for out in s.update(*pending):
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        pending = launched
    return outputs, plans


def test_plans_chunked_prefill_then_decodes_and_matches_outputs_by_request_id():
    s = _scheduler()
    _add(s, "a", 3, 4, ignore_eos=True)
    _add(s, "b", 20, 3, ignore_eos=True)  # more than the 16-token budget: chunked
    outputs, plans = _run(s, lambda rid, n: 100 + n if rid == "a" else 200 + n, overlap=False)
    assert outputs == {"a": [100, 101, 102, 103], "b": [200, 201, 202]}
    first = plans[0]
    assert [(r.request.request_id, r.num_tokens, r.samples) for r in first.rows] == [
        ("a", 3, True), ("b", 13, False)]
    assert first.batch.token_ids[:3].tolist() == [10, 11, 12]
    assert s.allocator.usage().used_pages == 0 and not s.requests


def test_overlapped_plans_feed_decodes_from_the_device_and_stop_exactly():
    """Planned one iteration ahead, outputs are those of the synchronous loop: a decode whose
    token is still in flight reads it from the previous step's samples (feed_rows), a stop
    token ends the request although one more token was planned, and max_tokens is never
    planned past."""
    def token_of(rid, n):
        return EOS if (rid == "a" and n == 2) else 50 + n

    runs = {}
    for overlap in (False, True):
        s = _scheduler()
        _add(s, "a", 5, 8)  # stops on EOS as its 3rd token
        _add(s, "b", 6, 3, ignore_eos=True)  # stops at max_tokens
        runs[overlap], plans = _run(s, token_of, overlap)
        assert s.allocator.usage().used_pages == 0 and not s.requests
        if overlap:
            # The second plan was made before the first's tokens were known: both decodes
            # read their token from row r of the previous step.
            second = plans[1]
            starts = np.flatnonzero(np.diff(np.r_[-1, second.batch.seq_ids]) != 0)
            assert second.batch.feed_rows[starts[:2]].tolist() == [0, 1]
            # No plan asks b for a 4th token.
            assert sum(r.samples for p in plans for r in p.rows
                       if r.request.request_id == "b") == 3
    assert runs[True] == runs[False] == {"a": [50, 51, EOS], "b": [50, 51, 52]}


def test_preemption_recomputes_and_keeps_outputs():
    # 5 pages of 4 tokens: two requests that grow to 11 cached tokens (3 pages) each
    # cannot both fit.
    for overlap in (False, True):
        s = _scheduler(num_pages=5)
        _add(s, "old", 6, 6, ignore_eos=True)
        _add(s, "new", 6, 6, ignore_eos=True)
        outputs, _ = _run(s, lambda rid, n: 30 + n, overlap)
        assert outputs == {"old": [30 + i for i in range(6)], "new": [30 + i for i in range(6)]}
        assert s.num_preemptions > 0
        assert s.allocator.usage().used_pages == 0


def test_abort_drops_a_request_whose_token_is_in_flight():
    s = _scheduler()
    _add(s, "a", 4, 5, ignore_eos=True)
    _add(s, "b", 4, 5, ignore_eos=True)
    plan = s.schedule()  # prefill of both, a token of each in flight
    assert s.abort("a") and not s.abort("a")
    outs = s.update(plan, _sample(plan, lambda rid, n: 7))
    assert [o.request_id for o in outs] == ["b"]
    assert s.allocator.page_table("b") and "a" not in s.requests


def test_time_budget_counts_tokens_in_flight_and_the_work_queued_before_the_plan():
    """Planned one iteration ahead, a request's budget counts the token still in flight as
    produced, by the time the device work queued before this plan (``queued_s``) is done."""
    s = _scheduler()
    s.policy = Policy("coserve", safety=0.9, banked_reserve=0.0)  # lends all it banked
    req = _add(s, "a", 3, 10, ignore_eos=True)
    req.slo = SLO(10.0, 0.1)
    prefill = s.schedule()
    s.update(prefill, _sample(prefill, lambda rid, n: 100 + n))  # the first token
    first = s.schedule()  # decodes the second token
    # Nothing banked yet: a normal iteration, 0.9 x 100 ms (less the microseconds since).
    assert 0.085 < first.time_limit <= 0.09
    # Planned while the second token is in flight, behind 50 ms of queued device work: the
    # third token may take 0.9 x 100 ms x 2 tokens from the first, less those 50 ms.
    second = s.schedule(queued_s=0.05)
    assert [r.request.request_id for r in second.rows] == ["a"]
    assert 0.125 < second.time_limit <= 0.13


def test_a_first_token_in_flight_starts_the_tpot_clock():
    """Planned while a request's first token is still in flight (the overlapped loop), the
    next iteration delays its second token: the request counts as decoding with nothing
    banked, not as a prompt with its TTFT slack to lend (a whole sample's check would
    otherwise let the sample land between its first two tokens)."""
    s = _scheduler()
    req = _add(s, "a", 3, 10)  # (it may stop at EOS: one token counted on to come)
    s.schedule()  # samples the first token; not read back yet
    now = time.monotonic() + 0.02
    assert s._progress(req, now, set()) == (0, 0.0, 1)
    # While planning the iteration that samples the first token, the request is in prefill.
    fresh = _add(s, "b", 3, 10, ignore_eos=True)
    fresh.in_flight = 1
    assert isinstance(s._progress(fresh, now, {"b"}), BeforeFirstToken)
    # A request of one token has no TPOT clock to start.
    single = _add(s, "c", 3, 1, ignore_eos=True)
    single.in_flight = 1
    assert isinstance(s._progress(single, now, set()), BeforeFirstToken)
    policy = Policy("coserve", safety=0.9, banked_reserve=1.0)
    policy.samples_beside_inference = True
    policy.slack_credit = 1.0
    assert not policy.sample_fits(0.01, 0.001, [1.0], [s._progress(req, now, set())])
    # One that only ``max_tokens`` ends absorbs the sample over its nine tokens to come.
    s = _scheduler()
    known = _add(s, "d", 3, 10, ignore_eos=True)
    s.schedule()
    assert s._progress(known, now, set()) == (0, 0.0, 9)
    assert policy.sample_fits(0.01, 0.001, [1.0], [s._progress(known, now, set())])


def _decoding_beside(prefills: dict[str, float], t16_s: float, t8_s: float = 0.001,
                     slo_prefill_chunks: bool = True) -> tuple[Scheduler, IterationPlan]:
    """A request decoding with a 10 ms TPOT target (prefill may take all of it, the margins
    included; nothing banked is lent), then prompts of 20 tokens that arrived
    ``prefills[rid]`` seconds ago (TTFT target 10 s); returns the scheduler and the plan that
    decodes beside them. Steps of 8 tokens take ``t8_s``, steps of 16 ``t16_s``."""
    s = _scheduler()
    s.slo_prefill_chunks = slo_prefill_chunks
    s.policy = Policy("coserve", spend_banked=False)
    for b in s.buckets:
        s.latency.times[bucket_key(b)] = t8_s if b.num_tokens == 8 else t16_s
    req = _add(s, "decoding", 3, 10, ignore_eos=True)
    req.slo = SLO(10.0, 0.01)
    prefill = s.schedule()
    s.update(prefill, _sample(prefill, lambda rid, n: 100 + n))
    for rid, age in prefills.items():
        _add(s, rid, 20, 2, ignore_eos=True).arrival_time = time.monotonic() - age
    return s, s.schedule()


def test_prefill_chunks_are_sized_to_what_the_decoding_requests_allow():
    """A long prompt enters over several iterations rather than stalling the decoding
    request for one step over its time (Sarathi-Serve's token budget, from the latency
    model)."""
    chunks = lambda plan: [(r.request.request_id, r.num_tokens) for r in plan.rows]  # noqa: E731
    # The 16-token step (50 ms) would not fit the 10 ms; the 8-token step (1 ms) does.
    _, plan = _decoding_beside({"new": 0.0}, t16_s=0.05)
    assert chunks(plan) == [("decoding", 1), ("new", 7)]
    # Prefill is paced by the TTFT targets: 0.9 x 30 ms left is 2.7 iterations of 10 ms, so
    # the 20 tokens are spread over two: 10 now; with 9 ms left, all it can.
    _, plan = _decoding_beside({"late": 9.97}, t16_s=0.05)
    assert chunks(plan) == [("decoding", 1), ("late", 10)]
    _, plan = _decoding_beside({"last": 9.99}, t16_s=0.05)
    assert chunks(plan) == [("decoding", 1), ("last", 15)]
    # Off, a chunk takes all the token budget left (vLLM's chunked prefill).
    _, plan = _decoding_beside({"new": 0.0}, t16_s=0.05, slo_prefill_chunks=False)
    assert chunks(plan) == [("decoding", 1), ("new", 15)]
    # Where it fits, the chunk is not cut.
    _, plan = _decoding_beside({"new": 0.0}, t16_s=0.005)
    assert chunks(plan) == [("decoding", 1), ("new", 15)]


def test_slot_headroom_is_the_stretch_that_keeps_the_requests_within_the_slots():
    """Stretching every iteration by a factor keeps that factor more requests present at the
    same arrival rate (Little's law). The stretch aims at the mean count that stays within
    the slots with probability ``safety`` (Poisson-distributed, 11.63 of 16 at 0.9): 4
    present allow 11.63 / 4 times the inference alone; at the aim, nothing beside it."""
    policy = Policy("coserve")
    aim = occupancy_aim(16, 0.9)
    assert aim == pytest.approx(11.63, abs=0.01)
    assert policy.slot_headroom(0.010, present=4, slots=16) == pytest.approx(0.010 * aim / 4)
    assert policy.slot_headroom(0.010, present=16, slots=16) < 0.010
    assert Policy("coserve", safety=1.0).slot_headroom(0.010, 4, 16) == pytest.approx(0.040)
    assert policy.slot_headroom(0.0, present=4, slots=16) is None  # not measured yet
    assert Policy("coserve", slot_headroom=False).slot_headroom(0.010, 4, 16) is None


def test_slot_headroom_stretches_the_gap_between_serving_iterations(monkeypatch):
    """The requests present are counted under the present gap between the iterations
    serving them, a whole sample between two of them included, so the headroom scales
    that gap, not the inference alone (which would settle the stretch where the requests
    present are the geometric mean of the slots and their unstretched count). A lull
    starts the gap afresh."""
    clock = iter([1.000, 1.030, 2.000])
    monkeypatch.setattr(policy_module.time, "perf_counter", lambda: next(clock))
    policy = Policy("coserve")
    serving = dict(had_inference=True, had_finetune=False, tpot_target=0.05)
    policy.observe(0.010, **serving)  # ends at 1.000
    policy.observe(0.015, had_inference=False, had_finetune=True, tpot_target=0.05)
    policy.observe(0.010, **serving)  # ends at 1.030: a 30 ms gap, the sample's included
    aim = occupancy_aim(16, policy.safety)
    assert policy.slot_headroom(0.010, present=8, slots=16) == pytest.approx(0.030 * aim / 8)
    assert policy.slot_headroom(0.040, present=8, slots=16) == pytest.approx(0.040 * aim / 8)
    policy.observe(0.005, had_inference=False, had_finetune=False, tpot_target=None)
    policy.observe(0.010, **serving)  # ends at 2.000, after a lull: not a gap
    assert policy.slot_headroom(0.010, present=8, slots=16) == pytest.approx(0.030 * aim / 8)


def test_finetuning_stretches_an_iteration_only_as_far_as_the_sequence_slots_allow():
    """Three requests decoding in 2 ms steps under a loose 100 ms TPOT target: the plan's
    time limit is the step times the occupancy aimed at over the 3 present. With 16
    sequence slots (aim 11.6) that stretches the iteration to 7.8 ms, still far below
    0.9 x 100 ms; with 4 (aim 2.13) it is below the step, so nothing finetunes beside them.
    With ``slot_headroom`` off, the target's."""
    plans = {}
    for slots, headroom in ((16, True), (4, True), (4, False)):
        s = _scheduler(max_num_seqs=slots)
        s.policy = Policy("coserve", spend_banked=False, slot_headroom=headroom)
        for b in s.buckets:
            s.latency.times[bucket_key(b)] = 0.002
        for rid in "abc":
            _add(s, rid, 3, 10, ignore_eos=True).slo = SLO(10.0, 0.1)
        prefill = s.schedule()
        s.update(prefill, _sample(prefill, lambda rid, n: 100 + n))
        plans[slots, headroom] = s.schedule()
        assert len(plans[slots, headroom].rows) == 3
    for slots in (16, 4):
        stretched = 0.002 * occupancy_aim(slots, 0.9) / 3
        assert plans[slots, True].slot_headroom_s == pytest.approx(stretched)
        assert plans[slots, True].time_limit == pytest.approx(stretched)
    assert plans[16, True].time_limit > 3 * 0.002 > 0.002 > plans[4, True].time_limit
    assert plans[4, False].slot_headroom_s is None
    assert plans[4, False].time_limit == pytest.approx(0.09, abs=1e-3)


def _priced(s: Scheduler, seconds_of) -> Scheduler:
    """Sets every bucket's measured time to ``seconds_of(bucket)``."""
    for b in s.buckets:
        s.latency.times[bucket_key(b)] = seconds_of(b)
    return s


def test_a_step_runs_in_the_cheapest_bucket_that_holds_it():
    """Where the latency model prices the 4-row buckets below the 2-row ones (a compiler can
    make the larger program the faster), ``cheapest_bucket`` runs two requests' decodes in a
    4-row bucket and prices the step at its time; without it, or with prices that rise with
    the bucket, or with the smallest bucket unmeasured, the smallest holding bucket runs."""
    def plan_of(cheapest: bool, seconds_of) -> IterationPlan:
        s = _priced(_scheduler(), seconds_of)
        s.cheapest_bucket = cheapest
        for rid in "ab":
            _add(s, rid, 3, 10, ignore_eos=True)
        prefill = s.schedule()
        s.update(prefill, _sample(prefill, lambda rid, n: 100 + n))
        return s, s.schedule()

    inverted = lambda b: 0.005 if b.num_seqs == 2 else 0.003  # noqa: E731
    s, plan = plan_of(True, inverted)
    assert plan.bucket == Bucket(8, 4, 4)
    assert s.predicted_step_seconds(plan) == pytest.approx(0.003)
    assert s._predict_shape(2, 2, 1, False) == pytest.approx(0.003)
    assert plan_of(False, inverted)[1].bucket == Bucket(8, 2, 4)
    rising = lambda b: 0.001 * b.num_seqs + 0.0001 * b.num_tokens  # noqa: E731
    assert plan_of(True, rising)[1].bucket == Bucket(8, 2, 4)
    s, plan = plan_of(True, inverted)
    _priced(s, rising)  # the latency model moved between two plans: the next one follows
    s.update(plan, _sample(plan, lambda rid, n: 100 + n))
    assert s.schedule().bucket == Bucket(8, 2, 4)
    s = _priced(_scheduler(), inverted)
    s.cheapest_bucket = True
    del s.latency.times[bucket_key(Bucket(8, 2, 4))]
    assert s.bucket_for(2, 2, 1, False) == Bucket(8, 2, 4)  # unmeasured: nothing to compare


def test_prompts_advance_when_no_prefill_chunk_fits():
    """When even the smallest step is over the limit, the first prompt still gets what
    fills the decodes' token bucket; the next waits."""
    s, plan = _decoding_beside({"first": 0.0, "second": 0.0}, t16_s=0.05, t8_s=0.02)
    assert [(r.request.request_id, r.num_tokens) for r in plan.rows] == [
        ("decoding", 1), ("first", 7)]
    assert [r.request_id for r in s.waiting] == ["second"]


@pytest.mark.parametrize("params, expected", [
    ({}, ((10, 3), (4, 1))),  # it may stop at EOS
    ({"ignore_eos": True, "stop_token_ids": (7,)}, ((10, 3), (4, 1))),  # or at a stop token
    ({"ignore_eos": True}, ((10, 7), (4, 1))),  # only max_tokens ends it
])
def test_a_request_behind_spreads_its_lack_over_the_tokens_it_may_still_produce(
        params, expected):
    """The tokens to come that ``Policy.iteration_limit`` spreads a lack over (and that
    ``Policy.sample_fits`` lets a request absorb a sample over): up to ``max_tokens``; where
    a sampled token may end the request, no more than it produced so far (it may stop
    early); where only ``max_tokens`` ends it, exactly those left."""
    for max_tokens, to_come in expected:
        s = _scheduler()
        req = _add(s, "a", 3, max_tokens, **params)
        for _ in range(3):  # the first token and two more (100 + n is no stop token)
            plan = s.schedule()
            s.update(plan, _sample(plan, lambda rid, n: 100 + n))
        tokens, _seconds, left = s._progress(req, time.monotonic(), set())
        assert (tokens, left) == (2, to_come), max_tokens


def test_a_request_far_behind_with_no_step_measured_still_lets_prompts_in():
    """A limit below zero (a request far behind) and a latency model with nothing measured
    (steps predicted at 0 s): prefill is not paced by a zero iteration time, and the first
    prompt still gets what fills the decodes' token bucket."""
    s = _scheduler()
    s.policy = Policy("coserve")
    req = _add(s, "behind", 3, 10, ignore_eos=True)
    req.slo = SLO(10.0, 0.01)
    prefill = s.schedule()
    s.update(prefill, _sample(prefill, lambda rid, n: 100 + n))
    req.first_token_time -= 1.0  # a second on its first token: far behind 10 ms a token
    _add(s, "new", 20, 2, ignore_eos=True).arrival_time = time.monotonic()
    plan = s.schedule()
    assert [(r.request.request_id, r.num_tokens) for r in plan.rows] == [("behind", 1),
                                                                         ("new", 7)]
