"""How much finetuning work each iteration carries: the hybrid policy and its baselines.

Inference is always scheduled first (decode tokens, then prefill chunks). The
policy then decides the finetuning share of the iteration:

- ``coserve``: the largest finetuning forward budget, plus backward pieces,
  that the latency model says keeps the iteration within the time the running
  requests can give it: for each request,
  ``safety`` times its TPOT target plus the time it has banked by being served
  faster than that so far (TPOT is a mean); the tightest request decides. A burst
  that fills the token budget leaves finetuning nothing, and so do full sequence slots:
  the stretch is also bounded by ``slot_headroom``, since stretched iterations keep more
  requests present at the same arrival rate. An iteration serving no request takes at most
  what a request arriving as it starts can wait for (``idle_limit``).
  That is the token-level unit (``SchedulingConfig.finetune_unit``). With the
  whole-sample unit, iterations serving requests carry no finetuning and bank
  what they leave of ``safety`` times the tightest target; when the bank covers
  the next whole sample (forward and full backward in one program, as
  ``temporal-seq`` runs it) and every running request can absorb the delay
  (``sample_fits``), an iteration runs that sample instead. A sample too long for a
  request arriving during it to meet its TTFT target (``sample_too_long``) never runs
  whole while requests run: it goes at token level there, as the token-level unit would
  run it (``token_fallback``).
- ``inference-only`` / ``finetune-only``: never / always finetune (the
  latter refuses inference requests).
- ``temporal-seq:N`` (FlexLLM's temporal-sharing baseline): every N-th iteration
  is a finetuning-only iteration that runs one whole training sample, its
  forward over all tokens and its backward through every layer, as a standard
  trainer runs it (one jitted ``jax.grad`` program, no token windows, no layer
  pieces); the others carry no finetuning.
- ``temporal:N`` (token-level ablation): the same period, but the finetuning
  iteration runs this engine's own token-level windows and backward pieces, as
  many as the token budget and ready pieces allow: co-serving's machinery
  without the co-batching.
- ``temporal-seq:dynamic`` / ``temporal:dynamic``: the same with N recomputed
  every iteration as the smallest N (the largest finetuning frequency) whose
  amortised cost keeps the mean time per output token within the tightest
  target, from observed iteration times: N - 1 inference iterations of t_inf and
  one finetuning iteration of t_ft must average at most safety * target per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Iterable

MODES_HELP = ("coserve, inference-only, finetune-only, temporal-seq:N, temporal-seq:dynamic "
              "(FlexLLM's temporal sharing: a whole sample every N iterations), temporal:N or "
              "temporal:dynamic (token-level ablation)")
TEMPORAL_KINDS = ("temporal", "temporal-seq")


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``"temporal:8"`` -> ("temporal", 8); ``"temporal-seq:dynamic"`` -> ("temporal-seq",
    None); raises ``ValueError`` naming the valid modes."""
    if mode in ("coserve", "inference-only", "finetune-only"):
        return mode, None
    kind, _, arg = mode.partition(":")
    if kind in TEMPORAL_KINDS:
        if arg == "dynamic":
            return kind, None
        if arg.isdigit() and int(arg) >= 1:
            return kind, int(arg)
    raise ValueError(f"mode must be one of {MODES_HELP}; got {mode!r}")


class Policy:
    """Per-iteration finetuning decisions of one engine."""

    def __init__(self, mode: str, safety: float = 0.9, max_period: int = 1024,
                 spend_banked: bool = True, banked_reserve: float = 1.0,
                 slot_headroom: bool = True, credit_cap: float = 1.0):
        self.mode = mode
        self.credit_cap = credit_cap
        """Samples' worth of slack credit kept while a sample waits (``cap_credit``)."""
        self.use_slot_headroom = slot_headroom
        self.spend_banked = spend_banked
        self.banked_reserve = banked_reserve
        self.kind, self.period = parse_mode(mode)
        self.safety = safety
        self.max_period = max_period
        self._since_finetune = 0
        # Observed seconds of inference-only and finetuning-only iterations (temporal).
        self._t_inference: float | None = None
        self._t_finetune: float | None = None
        self.samples_beside_inference = False
        """coserve: finetune through whole samples in iterations of their own while requests
        run, funded by ``slack_credit`` (the whole-sample unit), rather than through windows
        and pieces beside them (set by the scheduler, ``SchedulingConfig.finetune_unit``)."""
        self.slack_credit = 0.0
        """Seconds of slack the iterations serving requests left under ``safety`` times the
        tightest TPOT target, not yet spent on whole samples (the whole-sample unit)."""
        # Wall seconds from one iteration serving requests to the next, finetuning between
        # them included (an EMA; None until two have run back to back): ``slot_headroom``.
        self._serving_gap: float | None = None
        self._last_serving_end: float | None = None

    @property
    def serves_inference(self) -> bool:
        return self.kind != "finetune-only"

    @property
    def whole_samples(self) -> bool:
        """Finetuning runs as whole samples (``temporal-seq``), never as token windows and
        backward pieces."""
        return self.kind == "temporal-seq"

    def finetune_iteration(self, inference_waiting: bool, finetune_waiting: bool,
                           tpot_target: float | None) -> bool:
        """Temporal sharing: whether this iteration is a finetuning-only one."""
        if self.kind not in TEMPORAL_KINDS or not finetune_waiting:
            return False
        if not inference_waiting:
            return True
        period = self.period or self._dynamic_period(tpot_target)
        if self._since_finetune + 1 >= period:
            self._since_finetune = 0
            return True
        self._since_finetune += 1
        return False

    def _dynamic_period(self, tpot_target: float | None) -> int:
        if tpot_target is None or self._t_finetune is None or self._t_inference is None:
            return self.max_period
        slack = self.safety * tpot_target - self._t_inference
        if slack <= 0:
            return self.max_period
        return max(2, min(self.max_period, math.ceil(self._t_finetune / slack) + 1))

    def observe(self, seconds: float, had_inference: bool, had_finetune: bool,
                tpot_target: float | None = None, headroom_s: float | None = None) -> None:
        """Records an iteration's wall time: feeds temporal:dynamic, and the slack credit of
        coserve's whole-sample unit (``tpot_target``: the tightest target the iteration
        served; None when it served no request; ``headroom_s``: its ``slot_headroom``, which
        caps what it banks as it caps what finetunes beside it)."""
        def ema(old, new):
            return new if old is None else 0.8 * old + 0.2 * new

        if tpot_target is None:
            self._last_serving_end = None  # a lull: the next gap starts afresh
        elif had_inference:
            now = time.perf_counter()
            if self._last_serving_end is not None:
                self._serving_gap = ema(self._serving_gap, now - self._last_serving_end)
            self._last_serving_end = now

        if self.kind == "coserve" and self.samples_beside_inference and tpot_target is not None:
            if had_inference:
                allowed = self.safety * tpot_target
                if headroom_s is not None:
                    allowed = min(allowed, headroom_s)
                self.slack_credit += allowed - seconds
            elif had_finetune:  # a whole sample while requests ran: it spends the credit
                self.slack_credit -= seconds

        if had_inference and not had_finetune:
            self._t_inference = ema(self._t_inference, seconds)
        elif had_finetune and not had_inference:
            self._t_finetune = ema(self._t_finetune, seconds)

    def _unconstrained(self, finetune_iteration: bool, inference_running: bool,
                       time_limit: float | None, token_fallback: bool = False) -> bool | None:
        """True: finetune freely; False: not at all; None: within ``time_limit``.
        ``token_fallback``: the whole-sample unit runs this iteration's finetuning at token
        level, as the token-level unit would (a sample too long to run whole beside requests,
        ``sample_too_long``)."""
        if self.kind in ("inference-only", "temporal-seq"):
            return False  # temporal-seq finetunes only through whole samples
        if self.kind == "finetune-only" or finetune_iteration:
            return True
        if self.kind == "temporal":
            return not inference_running
        if self.samples_beside_inference and inference_running and not token_fallback:
            return False  # the slack is banked for whole samples
        if time_limit is None:
            return True  # (with nothing to serve, ``idle_limit`` may still bound it)
        return None

    def forward_tokens(self, *, finetune_iteration: bool, inference_running: bool,
                       tokens_left: int, time_limit: float | None, step_seconds,
                       piece_seconds: float, candidates: Iterable[int] | None = None,
                       token_fallback: bool = False, piece_ready: bool = False) -> int:
        """Finetuning forward tokens for this iteration.

        ``step_seconds(tokens)`` predicts the step with that many finetuning tokens
        added to the inference already scheduled. Under ``coserve`` the choice is
        the largest budget whose step, plus one backward piece when one is ready
        (``piece_seconds`` > 0), fits ``time_limit`` (see ``iteration_limit``); a piece
        that could not fit even beside the inference alone reserves nothing.
        ``candidates`` are the budgets worth pricing (default: powers of two and all
        that is left); the engine passes the ones that exactly fill a token bucket,
        since padding makes any smaller budget in the same bucket cost the same.
        ``token_fallback``: see ``_unconstrained``. With nothing to serve (an ``idle_limit``)
        and no backward piece ready (``piece_ready``; one ready runs whether it fits or not),
        the smallest budget runs where none fits: finetuning always makes progress.
        """
        free = self._unconstrained(finetune_iteration, inference_running, time_limit,
                                   token_fallback)
        if free is not None:
            return tokens_left if free else 0
        if step_seconds(0) + piece_seconds > time_limit:
            # The ready piece cannot run beside this iteration's inference at all; it waits
            # for a lighter iteration, and forward windows of other sequences go on.
            piece_seconds = 0.0
        options = _candidates(tokens_left) if candidates is None else sorted(
            {0, *(n for n in candidates if 0 < n <= tokens_left)})
        fitting = [n for n in options if step_seconds(n) + piece_seconds <= time_limit]
        tokens = max(fitting, default=0)
        if not tokens and not inference_running and not piece_ready and len(options) > 1:
            return options[1]  # with nothing to serve, one unit of finetuning at least
        return tokens

    def backward_seconds(self, *, finetune_iteration: bool, inference_running: bool,
                         tokens_left: int, time_limit: float | None,
                         step_seconds: float, token_fallback: bool = False,
                         stall_piece_s: float = 0.0) -> float:
        """Seconds of backward pieces to run after a step that took ``step_seconds``
        (``inf``: as many as are ready); none when inference alone filled the token
        budget (a burst). The engine runs a piece only while its predicted time fits.
        ``token_fallback``: see ``_unconstrained``. ``stall_piece_s``: the predicted
        seconds of the next piece where the iteration serves no request and runs no
        forward window; under a bound (``idle_limit``) that piece runs whether it fits or
        not, as ``forward_tokens`` runs the smallest window: finetuning always makes
        progress."""
        free = self._unconstrained(finetune_iteration, inference_running, time_limit,
                                   token_fallback)
        if free is not None:
            return math.inf if free else 0.0
        if tokens_left == 0:
            return 0.0
        return max(stall_piece_s, time_limit - step_seconds)

    def iteration_limit(self, targets, progress=None, margins: bool = True) -> float | None:
        """Seconds this iteration may take (None when no request runs).

        ``targets``: the running requests' TPOT targets. ``progress`` (same order):
        ``(tokens after the first, seconds since the first token[, tokens to come])`` of
        each request, a ``BeforeFirstToken`` for one still in its prefill, or None (nothing
        known).

        TPOT is a mean, so a request served faster than ``safety`` times its target so far
        has banked the difference, ``safety * target * tokens - seconds`` (negative when
        behind), and can absorb a longer iteration: it allows ``safety * target + banked``,
        which keeps its running mean within ``safety * target`` after this iteration's token
        too; ahead, it keeps ``banked_reserve`` targets of its bank back for iterations that
        overrun their prediction and lends only the rest. A request behind makes up its lack
        over the tokens it has to come (this one included; 1 when not given), which brings
        its mean back within ``safety * target`` by its last token, rather than asking this
        one iteration for all of it: one request that fell far behind would otherwise hold
        every iteration to nothing but its decodes for as long as it runs. Before its first
        token a request's TPOT clock has not started; what binds it is its TTFT, so it
        allows ``safety`` times the time left to its TTFT target, shared by this and the
        prefill iterations it still needs after it (at least ``safety * target``). One whose
        first token this iteration samples allows ``safety * target`` only: what the
        iteration runs after its step (backward pieces) delays its second token, the start
        of its TPOT. Built with ``spend_banked=False``
        (or given no ``progress``), each allows ``safety * target``. ``margins=False``:
        without the margins (a safety of 1 and no reserve), the time that keeps each
        request's mean at its target (what prefill chunks may take; finetuning keeps the
        margins).
        """
        targets = list(targets)
        if progress is None or not self.spend_banked:
            progress = [None] * len(targets)
        safety, reserve_targets = (self.safety, self.banked_reserve) if margins else (1.0, 0.0)
        limits = []
        for target, done in zip(targets, progress, strict=True):
            floor = safety * target
            if isinstance(done, BeforeFirstToken):
                share = (0.0 if done.prefill_iterations == 0 else
                         safety * done.ttft_left_s / (done.prefill_iterations + 1))
                limits.append(max(floor, share))
            elif done is not None:
                banked = safety * target * done[0] - done[1]
                # A request behind makes up what it lacks over the tokens it has to come; one
                # ahead lends only what it has banked beyond ``banked_reserve`` targets, which
                # it keeps for overruns.
                to_come = max(1, done[2]) if len(done) > 2 else 1
                reserve = reserve_targets * target
                limits.append(floor + (banked / to_come if banked < 0
                                       else max(0.0, banked - reserve)))
            else:
                limits.append(floor)
        return min(limits, default=None)

    def slot_headroom(self, inference_s: float, present: int, slots: int) -> float | None:
        """Seconds an iteration whose inference alone takes ``inference_s`` may take with
        finetuning beside it, or with the whole samples run before the next one (the credit
        it banks), so that the stretch does not fill the sequence slots (None: no bound;
        built with ``slot_headroom=False``). Stretching the time between a request's tokens
        by a factor lengthens the requests' lives by as much, and by Little's law the
        requests present at the same arrival rate. ``present`` of them (running and
        waiting) are counted under the present gap between serving iterations (finetuning
        between them included), so the gap may grow by ``aim / present``, ``aim`` being
        ``occupancy_aim(slots, safety)``. (Priced from ``inference_s`` alone, as if the
        present count were unstretched, the stretch settled where the requests present
        were the geometric mean of the aim and their unstretched count.) Below that the
        TPOT targets bind; at the aim or past it nothing finetunes beside the requests.

        The aim is below the slots because the count present is a mean, and at a mean near
        the slots bunched arrivals fill them (at the small tier's peak, 2026-12-06, aimed
        at all 16: 14 present on average, the slots full with 6-10 requests waiting in 145
        of 411 serving steps, and every request arriving then missed its TTFT)."""
        if not self.use_slot_headroom or present <= 0 or inference_s <= 0:
            return None  # (an unmeasured step predicts 0 s: no bound until it is measured)
        aim = occupancy_aim(slots, self.safety)
        return max(inference_s, self._serving_gap or 0.0) * aim / present

    def cap_credit(self, sample_s: float) -> None:
        """Keeps the slack credit at most ``credit_cap`` samples of ``sample_s`` seconds, so
        that the credit of a lull is not spent in a burst of samples. The scheduler caps it
        while a sample waits (``sample_fits`` refused it), not when one runs; and while
        requests are present it runs no sample unit right after another, so a credit of
        several samples is spent one sample every other iteration at most. What a cap drops
        is slack the requests left and finetuning never gets back: a cap above one lets the
        iterations after a wait (a request near its deadline, which could absorb no sample)
        catch up on it."""
        self.slack_credit = min(self.slack_credit, self.credit_cap * sample_s)

    def idle_limit(self, arrival_ttft_s: float | None, step_s: float,
                   queued_s: float = 0.0) -> float | None:
        """coserve: seconds an iteration with no request present may take (None: no bound).
        A request arriving as it is planned waits for the device work queued before it
        (``queued_s``), for it, and for its own first step (``step_s``, or the observed mean
        of the iterations serving requests where that is longer), which must fit in
        ``safety`` times its TTFT target ``arrival_ttft_s``; at low load nearly every
        arrival lands in such an iteration. A whole sample longer than this runs at
        token level instead (``sample_too_long``), and token-level finetuning fills no more
        than this, except that it always runs one backward piece or one forward window
        (``forward_tokens``, ``backward_seconds``): where no unit fits, finetuning would
        otherwise stall."""
        if self.kind != "coserve" or arrival_ttft_s is None:
            return None
        return self.safety * arrival_ttft_s - max(step_s, self._t_inference or 0.0) - queued_s

    def sample_too_long(self, sample_s: float, step_s: float, arrival_ttft_s: float | None,
                        queued_s: float = 0.0) -> bool:
        """coserve's whole-sample unit: whether a whole sample of ``sample_s`` seconds may
        never run while requests do: it is longer than an iteration with nothing to serve
        may take (``idle_limit``; with ``queued_s``, whether it may run after that much
        queued work). Under load requests arrive every few iterations, so a
        longer sample would cause TTFT misses, not rare ones. Such a sample runs at token
        level instead (``token_fallback`` while requests run), in any whole-sample mode of
        coserve (the whole-sample unit, ``idle_whole_samples``); ``temporal-seq``, FlexLLM's
        baseline, runs every sample whole."""
        limit = self.idle_limit(arrival_ttft_s, step_s, queued_s)
        return limit is not None and sample_s > limit

    def sample_fits(self, sample_s: float, step_s: float, targets, progress,
                    arrival_ttft_s: float | None = None) -> bool:
        """coserve's whole-sample unit: whether an iteration running a whole sample of
        ``sample_s`` seconds, before the next step of ``step_s``, may go now.

        The slack credit must cover it (the iterations so far left that much beside their
        requests: on average the samples take no more than the slack; ``cap_credit`` keeps
        it at one sample). And every
        request must be able to absorb the delay: ``progress`` as ``iteration_limit`` takes
        it, of the running and waiting requests. One decoding (``(tokens after the first,
        seconds since the first, tokens to come)``) keeps its mean TPOT within ``safety``
        times its target by its last token if the tokens to come take ``step_s`` each, or
        the observed mean of the iterations serving requests where that is longer (prefill
        chunks, host time and bursts make them longer than a predicted step), with
        ``banked_reserve`` targets kept back for overruns; one before its first token keeps
        ``safety`` times the time left to its TTFT target for this and its prefill steps;
        one with nothing known allows ``safety`` times its target for both.

        ``arrival_ttft_s``: the TTFT target of a request that arrives while the sample runs:
        a sample ``sample_too_long`` for it never fits.
        """
        if self.slack_credit <= 0 or self.slack_credit < sample_s:
            return False  # (an unmeasured sample, predicted 0 s, first runs when idle)
        if self.sample_too_long(sample_s, step_s, arrival_ttft_s):
            return False
        step_s = max(step_s, self._t_inference or 0.0)
        for target, done in zip(targets, progress, strict=True):
            if isinstance(done, BeforeFirstToken):
                needed = sample_s + (done.prefill_iterations + 1) * step_s
                allowed = self.safety * done.ttft_left_s
            elif done is not None:
                produced, elapsed, to_come = done
                to_come = max(1, to_come)
                needed = sample_s + to_come * step_s
                allowed = (self.safety * target * (produced + to_come) - elapsed
                           - self.banked_reserve * target)
            else:
                needed, allowed = sample_s + step_s, self.safety * target
            if needed > allowed:
                return False
        return True


@dataclasses.dataclass(frozen=True)
class BeforeFirstToken:
    """A running request that has not produced its first token yet (it is in prefill)."""

    ttft_left_s: float
    """Seconds left until its TTFT target (negative when already missed)."""
    prefill_iterations: int
    """Iterations it still needs after this one to finish its prompt (0: this iteration
    samples its first token)."""


@functools.cache  # (the same slots and safety at every serving iteration of an engine)
def occupancy_aim(slots: int, safety: float) -> float:
    """The mean number of requests present that keeps them within ``slots`` with
    probability ``safety``. Under Poisson arrivals, with a slot for every request present
    (an M/G/inf queue while the slots last), the number present is Poisson-distributed:
    mean m, deviation sqrt(m); its normal approximation m + z sqrt(m) = ``slots``, z the
    ``safety`` quantile of the standard normal, gives m (11.6 of 16 slots at 0.9, 236 of
    256: large slot counts fluctuate relatively less). No margin at a ``safety`` of 1 (or a
    half or less: the median needs none)."""
    if safety >= 1.0 or safety <= 0.5:
        return float(slots)
    z = statistics.NormalDist().inv_cdf(safety)
    root = (-z + math.sqrt(z * z + 4 * slots)) / 2
    return root * root


def _candidates(tokens_left: int) -> list[int]:
    """Finetuning budgets worth trying: 0, then powers of two, then everything left."""
    out, n = [0], 1
    while n < tokens_left:
        out.append(n)
        n *= 2
    if tokens_left > 0:
        out.append(tokens_left)
    return out
