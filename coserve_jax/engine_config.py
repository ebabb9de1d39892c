"""The engine's configuration, in parts, and the lengths and bucket axes derived from it.

``EngineConfig`` composes small frozen parts: the KV cache, the step buckets, the adapter
slots, finetuning, scheduling, telemetry and kernels. Each part checks its own fields; the
whole checks what spans parts. ``EngineConfig.flat(page_size=4, mode="coserve", ...)``
builds one from the flat field names (``kernels`` is ``KernelConfig.impl``).

``derive_lengths`` turns a model and an engine config into the lengths and bucket axes that
both the engine and ``coserve plan`` use, so the two cannot disagree.
``derive_trainer_config`` is the one place that turns it into the trainer's config.
"""

from __future__ import annotations

import dataclasses

from coserve_jax.batch import powers_of_two
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.policy import parse_mode
from coserve_jax.slo import SLO
from pallas_kernels.dispatch import IMPLS as KERNEL_IMPLS


def _check(part, minimum: int, *names: str) -> None:
    """Each field in ``names`` is an integer >= ``minimum`` (1 or 0)."""
    for name in names:
        value = getattr(part, name)
        if not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else "an integer >= 0"
            raise ValueError(f"{type(part).__name__}.{name} must be {kind}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache and the longest sequence it serves."""

    page_size: int = 16
    """Tokens per KV page."""
    num_pages: int = 512
    """KV pages in the cache (shared by all sequences)."""
    max_model_len: int | None = None
    """Longest prompt plus output; None means min(model limit, 2048)."""

    def __post_init__(self):
        _check(self, 1, "page_size", "num_pages")


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The shapes one iteration is padded to: every bucket is compiled once."""

    max_num_seqs: int = 16
    """Sequences per step at most (the largest sequence bucket)."""
    max_num_batched_tokens: int = 128
    """Token budget of one iteration (the largest token bucket)."""
    min_token_bucket: int = 16
    """Smallest token bucket; buckets double up to max_num_batched_tokens."""
    min_seq_bucket: int = 4
    """Smallest sequence bucket; buckets double up to max_num_seqs."""
    min_page_bucket: int = 8
    """Smallest page-table width bucket; buckets double up to the pages of max_model_len.
    The reference attention reads every column, so short contexts use narrow tables."""

    def __post_init__(self):
        _check(self, 1, "max_num_seqs", "max_num_batched_tokens", "min_token_bucket",
               "min_seq_bucket", "min_page_bucket")


@dataclasses.dataclass(frozen=True)
class AdapterSlotsConfig:
    """The LoRA adapter slots that serving and training share."""

    max_adapters: int = 4
    """LoRA adapter slots (serving and training share them); 0 disables LoRA."""
    max_lora_rank: int = 16
    """Rank every slot is padded to; adapters of higher rank are refused."""
    lora_target_modules: tuple[str, ...] = ALL_TARGETS
    """Projections the slots carry."""

    def __post_init__(self):
        _check(self, 0, "max_adapters")
        _check(self, 1, "max_lora_rank")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning inside the engine: sequences in flight and the backward pieces."""

    max_train_seqs: int = 2
    """Finetuning sequences in flight at once (activation store rows); 0 disables finetuning."""
    max_train_len: int | None = None
    """Longest finetuning sequence in tokens; None means min(512, max_model_len)."""
    train_window: int = 64
    """Tokens of one training sequence's forward per iteration at most."""
    backward_layers: int = 1
    """Layers per backward piece (must divide the model's layers): the piece-size knob."""
    backward_pieces_per_step: int = 1
    """Backward pieces run after each step at most."""
    backward_attention_block: int = 256
    """Queries per attention block in backward pieces (bounds their attention memory)."""
    backward_block: int = 0
    """Tokens per backward piece for training sequences longer than this: such a sequence
    is pulled back one layer and one token block at a time, so a piece's cost is bounded
    by the block rather than the sequence and fits beside a decode step; 0 keeps every
    piece over the whole sequence. A power of two; single device only."""
    keep_projections: bool = False
    """Save every projection's output of a training token in its forward (FlexLLM's graph
    pruning), so a backward piece runs none of the forward's frozen matmuls again, only
    attention and the elementwise ops (a one-layer piece measured 25-30% cheaper on the
    CPU tiers; the engine's finetuning gain there was within noise). The activation
    store then holds (q + 2 kv + 2 hidden + 2 intermediate) / hidden times as much per
    token (about 10x for Llama shapes). False saves each layer's input alone, and a piece
    recomputes the whole layer. Whole-sequence pieces only (``backward_block`` 0)."""
    sample_segments: int = 4
    """coserve's whole samples (``SchedulingConfig.finetune_unit`` "samples", idle
    iterations): a sample whose whole program would delay the running requests' next
    token by more than their tightest TPOT target, or is too long for a request arriving
    during it to meet its TTFT target, runs in 2K - 1 iterations of its own over K
    segments of layers instead (``runner_commands.RunSamplePart``: each segment's forward,
    the top one's forward, loss and backward, each segment's backward; the pullbacks'
    residuals stay on the device between them, so nothing is recomputed); a sample too
    long to run whole beside requests whose longest part is too long as well runs at
    token level. The segments are sized by cost (``step.segment_bounds``): the top one,
    whose part also runs the LM head, holds fewer layers than the others, or none. 1
    never splits a sample; more than the model's layers means as many segments as layers.
    Single device."""

    def __post_init__(self):
        _check(self, 1, "train_window", "backward_layers", "backward_pieces_per_step",
               "backward_attention_block", "sample_segments")
        _check(self, 0, "max_train_seqs", "backward_block")
        if self.keep_projections and self.backward_block:
            raise ValueError("FinetuneConfig.keep_projections needs whole-sequence backward "
                             f"pieces (backward_block 0, got {self.backward_block})")


@dataclasses.dataclass(frozen=True)
class SchedulingConfig:
    """How iterations are filled, and which requests are admitted: never a shape."""

    mode: str = "coserve"
    """coserve, inference-only, finetune-only; temporal-seq:N or temporal-seq:dynamic
    (FlexLLM's temporal sharing: one whole sample, forward and full backward, every N
    iterations); temporal:N or temporal:dynamic (the token-level ablation). See
    ``coserve_jax.policy``."""
    spend_banked_slack: bool = True
    """coserve: a request served faster than its TPOT target so far may absorb a longer
    iteration (TPOT is a mean over the request). False keeps every iteration within the
    safety margin of the tightest target."""
    banked_reserve: float = 1.0
    """coserve, spending banked slack: what a request keeps of its banked time, in TPOT
    targets, and never lends to a longer iteration: the margin that absorbs an iteration
    running over its prediction. 0 lends all of it (the first request of a burst then often
    has nothing left when one overruns)."""
    safety: float = 0.9
    """The share of the tightest request's time an iteration is planned to fill (coserve),
    and of the TPOT target the dynamic temporal modes keep their mean within."""
    default_ttft_s: float = 5.0
    """TTFT target of requests that set none (arrival to first token, queueing included);
    also what a request arriving during a whole sample is assumed to need
    (``finetune_unit``)."""
    default_tpot_s: float = 0.1
    """TPOT target of requests that set none (mean time per output token after the first)."""
    max_waiting: int = 1024
    """Requests queued at most; more are refused at admission."""
    admission_control: bool = True
    """Refuse requests whose TTFT target the queue ahead of them already makes impossible."""
    idle_whole_samples: bool = False
    """coserve: an iteration with no request to serve, and no training sequence in flight on
    the token-level path, runs one whole training sample instead (its forward and full
    backward in one program, as ``temporal-seq`` does): idle capacity goes to the program
    that finetunes fastest (no recompute, no windows). A request arriving meanwhile waits
    for it, so a sample too long for it to meet ``default_ttft_s`` runs at token level
    (``Policy.sample_too_long``). Single device."""
    finetune_unit: str = "auto"
    """coserve: the unit of finetuning work while requests run. "tokens": forward windows in
    the inference steps and backward pieces in the time they leave (FlexLLM's token-level
    co-serving). "samples": iterations serving requests carry no finetuning and bank what
    they leave of ``safety`` times the tightest TPOT target; when the bank covers the next
    whole sample and every running or waiting request can absorb the delay
    (``Policy.sample_fits``), one iteration runs it, forward and full backward in one
    program, as a standard trainer does (idle iterations run whole samples too); a sample
    too long for a request arriving meanwhile to meet ``default_ttft_s`` (or a present
    request's tighter TTFT target) runs at token level instead, whether requests run or
    not (``Policy.sample_too_long``). "auto": the
    one the latency model predicts costs less per finetuning token
    (``Scheduler.finetune_costs``), chosen by ``Engine.warmup``. Whole samples run on one
    device only."""
    slot_headroom: bool = True
    """coserve: finetuning never stretches the time between two iterations serving requests
    past the present such time (or the inference alone, if longer) times the occupancy it
    aims at over the requests present, running and waiting (``Policy.slot_headroom``): the
    mean count that stays within ``max_num_seqs`` with probability ``safety`` under Poisson
    arrivals (``policy.occupancy_aim``: 11.6 of 16 slots, 236 of 256). A stretch
    lengthens every request's life by as much, and at the same arrival rate the requests
    present with it, until they fill the sequence slots and arrivals queue for one (their
    TTFT then runs on through whole lifetimes of the running ones). False: the TPOT targets
    alone bound the stretch."""
    sample_credit_cap: float = 1.0
    """coserve's whole-sample unit: the slack credit kept while a sample waits for the
    requests to be able to absorb it, in samples (``Policy.cap_credit``). 1 keeps one
    sample's worth and drops the rest: the slack of the iterations spent waiting never
    reaches finetuning. More lets later iterations spend it, one sample unit every other
    iteration at most, each still held to every request's deadline (``Policy.sample_fits``)."""
    cheapest_bucket: bool = True
    """A step runs in the bucket that the latency model prices lowest of those that hold it,
    rather than in the smallest (``Scheduler.bucket_for``): a compiler may make a larger
    bucket's program the faster one (on the 2-core CPU, 16 rows of decode ran in 0.66x the
    time of 8, at 32 pages wide). Where padding only adds work, the smallest is the
    cheapest and nothing changes. False: the smallest, always."""
    slo_prefill_chunks: bool = True
    """Size each prefill chunk so that the iteration's predicted time keeps every decoding
    request's mean TPOT within its target (``Policy.iteration_limit`` without the margins
    finetuning keeps): the per-iteration token budget Sarathi-Serve derives from the TPOT
    target, here from the latency model. A long prompt then enters over several iterations
    instead of stalling every decoding request for one long step. Prefill is paced so that
    the queue still meets its TTFT targets, and the first chunk of an iteration is at least
    what fills the token bucket the decodes already use. False: a chunk takes all the token
    budget left (vLLM's chunked prefill)."""
    overlap_host: bool = True
    """Plan and dispatch iteration i+1 while iteration i runs on the device, so host time
    hides behind device time (sampled tokens feed the next step on the device). False runs
    the synchronous loop: schedule, run, read back, update. The dynamic temporal modes
    always run synchronously (their period is set from each iteration's own time)."""

    def __post_init__(self):
        parse_mode(self.mode)
        if self.finetune_unit not in ("tokens", "samples", "auto"):
            raise ValueError(f"finetune_unit must be 'tokens', 'samples' or 'auto'; got "
                             f"{self.finetune_unit!r}")
        SLO(self.default_ttft_s, self.default_tpot_s)
        if not 0 < self.safety <= 1:
            raise ValueError(f"SchedulingConfig.safety must be in (0, 1]; got {self.safety}")
        if not self.sample_credit_cap >= 1:
            raise ValueError(f"SchedulingConfig.sample_credit_cap must be >= 1 (samples); got "
                             f"{self.sample_credit_cap}")
        if not self.banked_reserve >= 0:
            raise ValueError(f"SchedulingConfig.banked_reserve must be >= 0; got "
                             f"{self.banked_reserve}")


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """Where the engine writes what it measures."""

    run_dir: str | None = None
    """TensorBoard event files (job and serving scalars) go here; None writes none."""
    log_every: int = 50
    """Iterations between serving scalars."""
    latency_model_dir: str | None = None
    """Where the measured latency model is kept; None means the cache root."""

    def __post_init__(self):
        _check(self, 1, "log_every")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which implementations the programs run, and where their compilations are kept."""

    impl: str = "auto"
    """Attention and LoRA implementations of the step and the backward pieces, chosen once
    when the engine is built: "auto" (the kernels on GPU and TPU, the jnp references on
    CPU; $COSERVE_KERNELS overrides it), "kernel" (needs a GPU or TPU), "reference", or
    "interpret" (the Pallas kernels in interpret mode, for CPU tests). Sharded engines
    run the Pallas kernels under shard_map (jax's TPU kernels are not wrapped: a sharded
    TPU engine runs the references)."""
    compilation_cache_dir: str | None = None
    """JAX persistent compilation cache; None means $COSERVE_XLA_CACHE or ~/.cache."""
    dense_lora: bool | None = None
    """The step's multi-slot LoRA as a masked einsum over every slot (the reference's
    formulation) on every path, instead of the grouped Pallas kernel or ``lax.ragged_dot``.
    None: by backend, on a GPU only (``pallas_kernels.KernelOptions.dense_lora`` says what
    was measured)."""
    skip_unused_lora: bool | None = None
    """Skip the step's LoRA at run time when no token of the batch names a slot. Each skip
    is a conditional, which on XLA:GPU waits for its predicate on the host. None: by
    backend, off on a GPU (``KernelOptions.skip_unused_lora``)."""
    unroll_layers: bool | None = None
    """The step's layers as a loop over static weight slices instead of a scan. None: by
    backend, on a GPU only (``pallas_kernels.KernelOptions.unroll_layers`` says what was
    measured)."""
    xla_options: str = ""
    """XLA options the step and the training programs are compiled with, as
    "name=value" pairs separated by commas: for example
    "xla_gpu_enable_triton_gemm=false" for cuBLAS GEMMs instead of Triton ones. Values
    "true"/"false" are booleans, numbers are numbers, anything else a string. XLA checks
    the names when the engine is built."""

    def __post_init__(self):
        if self.impl not in KERNEL_IMPLS:
            raise ValueError(f"KernelConfig.impl must be one of "
                             f"{', '.join(map(repr, KERNEL_IMPLS))}, got {self.impl!r}")
        self.compiler_options()  # a malformed entry fails here, not at the first compile

    def compiler_options(self) -> tuple[tuple[str, bool | int | float | str], ...]:
        """``xla_options`` as (name, value) pairs."""
        pairs = []
        for item in filter(None, (part.strip() for part in self.xla_options.split(","))):
            name, sep, text = (part.strip() for part in item.partition("="))
            if not sep or not name.startswith("xla_") or not text:
                raise ValueError(f"KernelConfig.xla_options: expected 'xla_name=value' "
                                 f"entries separated by commas, got {item!r}")
            pairs.append((name, _option_value(text)))
        return tuple(pairs)


def _option_value(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_PARTS: dict[str, type] = {
    "cache": CacheConfig, "buckets": BucketConfig, "adapters": AdapterSlotsConfig,
    "finetune": FinetuneConfig, "scheduling": SchedulingConfig,
    "telemetry": TelemetryConfig, "kernels": KernelConfig,
}
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    ("kernels" if cls is KernelConfig and f.name == "impl" else f.name): (part, f.name)
    for part, cls in _PARTS.items() for f in dataclasses.fields(cls)
}
"""Flat field name (the single-level config of old) -> (part, field of the part)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacity and shape settings of one engine, in parts."""

    cache: CacheConfig = CacheConfig()
    """The paged KV cache and the longest sequence."""
    buckets: BucketConfig = BucketConfig()
    """The step's token, sequence and page-table buckets."""
    adapters: AdapterSlotsConfig = AdapterSlotsConfig()
    """LoRA adapter slots."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Finetuning sequences in flight and the backward pieces."""
    scheduling: SchedulingConfig = SchedulingConfig()
    """Scheduling mode, SLO defaults and admission."""
    telemetry: TelemetryConfig = TelemetryConfig()
    """TensorBoard scalars and the latency model's directory."""
    kernels: KernelConfig = KernelConfig()
    """Kernel implementations and the compilation cache."""

    def __post_init__(self):
        for part, cls in _PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise TypeError(f"EngineConfig.{part} must be a {cls.__name__}, "
                                f"got {getattr(self, part)!r}")
        if self.finetune.max_train_seqs and not self.adapters.max_adapters:
            raise ValueError("finetuning (max_train_seqs > 0) needs max_adapters > 0")
        if self.buckets.max_num_seqs > self.buckets.max_num_batched_tokens:
            raise ValueError("BucketConfig.max_num_seqs cannot exceed max_num_batched_tokens")

    @classmethod
    def flat(cls, **fields) -> EngineConfig:
        """A config from the flat field names (``FLAT_FIELDS``), the rest defaults."""
        return cls().replace(**fields)

    def replace(self, **flat_fields) -> EngineConfig:
        """A copy with the named flat fields replaced; an unknown name raises ``TypeError``."""
        changes: dict[str, dict] = {}
        for name, value in flat_fields.items():
            if name not in FLAT_FIELDS:
                raise TypeError(f"EngineConfig has no field {name!r}")
            part, field = FLAT_FIELDS[name]
            changes.setdefault(part, {})[field] = value
        return dataclasses.replace(self, **{
            part: dataclasses.replace(getattr(self, part), **fields)
            for part, fields in changes.items()})


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Lengths and bucket axes an engine config gives one model."""

    max_model_len: int
    """Longest prompt plus output: min(model limit, ``CacheConfig.max_model_len`` or 2048)."""
    max_pages_per_seq: int
    """KV pages of a sequence at ``max_model_len`` (the widest page table)."""
    max_train_len: int
    """Longest finetuning sequence: ``FinetuneConfig.max_train_len`` or min(512,
    ``max_model_len``)."""
    token_buckets: tuple[int, ...]
    """Token axis of the step buckets: doubling from ``min_token_bucket`` up to
    ``max_num_batched_tokens``."""
    seq_buckets: tuple[int, ...]
    """Sequence axis of the step buckets: doubling up to ``max_num_seqs``."""
    page_buckets: tuple[int, ...]
    """Page-table width axis of the step buckets: doubling up to ``max_pages_per_seq``."""
    train_seq_buckets: tuple[int, ...]
    """Sequence-length buckets of the backward pieces: doubling from
    min(``TrainerConfig.min_seq_bucket``, ``max_train_len``) up to ``max_train_len``."""


def derive_trainer_config(engine_config: EngineConfig, max_train_len: int):
    """The ``TrainerConfig`` of an engine that finetunes (None when it does not):
    ``FinetuneConfig`` with the derived ``max_train_len``."""
    from coserve_jax.finetune.trainer import TrainerConfig

    ft = engine_config.finetune
    if not ft.max_train_seqs:
        return None
    return TrainerConfig(max_seqs=ft.max_train_seqs, max_len=max_train_len,
                         window=ft.train_window, backward_layers=ft.backward_layers,
                         attention_block=ft.backward_attention_block, block=ft.backward_block,
                         keep_projections=ft.keep_projections,
                         sample_segments=ft.sample_segments)


def derive_lengths(model_config, engine_config: EngineConfig) -> Lengths:
    """The lengths and bucket axes of ``engine_config`` for a model (a ``ModelConfig``).
    Raises ``ValueError`` when the engine finetunes and ``max_train_len`` is outside
    [2, ``max_model_len``], or its ``backward_block`` is not a power of two."""
    from coserve_jax.finetune.trainer import TrainerConfig, train_seq_buckets

    ec, b = engine_config, engine_config.buckets
    max_model_len = min(model_config.max_position_embeddings, ec.cache.max_model_len or 2048)
    max_pages_per_seq = -(-max_model_len // ec.cache.page_size)
    max_train_len = ec.finetune.max_train_len or min(512, max_model_len)
    if ec.finetune.max_train_seqs and not 2 <= max_train_len <= max_model_len:
        raise ValueError(f"FinetuneConfig.max_train_len ({max_train_len}) must be in "
                         f"[2, model length {max_model_len}]")
    # The trainer's own buckets; an engine that does not finetune gets the defaults'.
    tc = derive_trainer_config(ec, max_train_len) or TrainerConfig(
        max_seqs=0, max_len=max_train_len, window=1, backward_layers=1)
    return Lengths(
        max_model_len=max_model_len, max_pages_per_seq=max_pages_per_seq,
        max_train_len=max_train_len,
        token_buckets=powers_of_two(b.min_token_bucket, b.max_num_batched_tokens),
        seq_buckets=powers_of_two(min(b.min_seq_bucket, b.max_num_seqs), b.max_num_seqs),
        page_buckets=powers_of_two(min(b.min_page_bucket, max_pages_per_seq),
                                   max_pages_per_seq),
        train_seq_buckets=train_seq_buckets(tc))
