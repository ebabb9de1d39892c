"""A plan before a launch: will a model, an engine config and a mesh fit the devices?

Per device it counts the frozen weights, the KV pages (and the tokens they
hold), the adapter slots, the finetuning buffers (activation store, boundary
gradient, LoRA gradient accumulators), the jobs' LoRA weights and optimizer
state, and the temporaries of the two programs an iteration runs (the
co-serving step at its largest bucket and a backward piece at the longest
training sequence; they run one after the other, so the larger one counts).

State sizes are exact: they come from the shapes and the partition specs that
``sharding.layout`` gives each array. Temporaries come from XLA's compiled
memory analysis of the real sharded programs, lowered on abstract inputs
(``jax.ShapeDtypeStruct``: nothing is allocated) over as many virtual CPU
devices as the mesh has, so no accelerator and no checkpoint is needed.

XLA:CPU cannot multiply bfloat16: it upcasts bf16 dots to f32 and hoists f32
copies of the stacked weights out of the layer loop, which would swamp the
temporaries with an artifact no GPU or TPU has. So temporaries are compiled in
float16 (the same two bytes) with XLA's ``change-op-data-type`` pass disabled,
under which the CPU dot emitter keeps two-byte operands and outputs, as bf16
GEMMs do on GPUs and TPUs (the method of ``bench/finetune_memory.py``; a check
refuses to go on if a float16 matmul still gets f32 temporaries). The
accelerator compilers fuse differently, so temporaries are an estimate; state
is not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coserve_jax.config import ModelConfig
from coserve_jax.lora.config import LoraConfig

GB = 1e9
CPU_NO_UPCAST_FLAG = "--xla_disable_hlo_passes=change-op-data-type"

# The config.json values the model reads, as published by Meta and Qwen.
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "qwen2.5-14b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 131072, "sliding_window": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648,
        "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 131072, "sliding_window": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
}
ALIASES = {"llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b": "llama-3.1-8b",
           "qwen2.5-14b": "qwen2.5-14b", "qwen/qwen2.5-14b": "qwen2.5-14b",
           "qwen2.5-32b": "qwen2.5-32b", "qwen/qwen2.5-32b": "qwen2.5-32b"}
# FlexLLM's finetuning job: LoRA r=16 on down_proj.
FLEXLLM_JOB = LoraConfig(r=16, lora_alpha=32, target_modules=("down_proj",))


def resolve_model(name_or_path: str) -> tuple[ModelConfig, str]:
    """A preset name (``llama-3.1-8b``, ``qwen2.5-14b``, ``qwen2.5-32b``), a Hugging Face
    model directory or a ``config.json`` path -> (config, label)."""
    key = ALIASES.get(name_or_path.lower())
    if key is not None:
        return ModelConfig.from_hf_dict(PRESETS[key]), key
    path = name_or_path
    if os.path.isdir(path):
        return ModelConfig.from_pretrained(path), os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        import json

        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f)), os.path.basename(path)
    raise ValueError(f"{name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor a model "
                     "directory or config.json")


# ----- abstract state ------------------------------------------------------------------------


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def abstract_params(cfg: ModelConfig, dtype):
    """``Params`` of ``ShapeDtypeStruct`` leaves (biases and untied head as the config says)."""
    from coserve_jax.models.llama import LayerParams, Params

    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    bias = cfg.qkv_bias
    layers = LayerParams(
        input_norm=_sds((n, d), dtype), q_proj=_sds((n, d, cfg.q_size), dtype),
        k_proj=_sds((n, d, cfg.kv_size), dtype), v_proj=_sds((n, d, cfg.kv_size), dtype),
        o_proj=_sds((n, cfg.q_size, d), dtype), post_norm=_sds((n, d), dtype),
        gate_proj=_sds((n, d, f), dtype), up_proj=_sds((n, d, f), dtype),
        down_proj=_sds((n, f, d), dtype),
        q_bias=_sds((n, cfg.q_size), dtype) if bias else None,
        k_bias=_sds((n, cfg.kv_size), dtype) if bias else None,
        v_bias=_sds((n, cfg.kv_size), dtype) if bias else None,
        o_bias=_sds((n, d), dtype) if cfg.o_bias else None)
    return Params(embed=_sds((cfg.vocab_size, d), dtype), layers=layers,
                  final_norm=_sds((d,), dtype),
                  lm_head=None if cfg.tie_word_embeddings else _sds((d, cfg.vocab_size), dtype))


def abstract_batch(num_tokens: int, num_seqs: int, num_pages: int):
    """A ``TokenBatch`` bucket of abstract arrays."""
    from coserve_jax.batch import TokenBatch

    t, s = (num_tokens,), (num_seqs,)
    i32, f32 = jnp.int32, jnp.float32
    return TokenBatch(
        token_ids=_sds(t, i32), positions=_sds(t, i32), seq_ids=_sds(t, i32),
        slots=_sds(t, i32), token_mask=_sds(t, jnp.bool_),
        page_tables=_sds((num_seqs, num_pages), i32), logits_indices=_sds(s, i32),
        temperature=_sds(s, f32), top_k=_sds(s, i32), top_p=_sds(s, f32), seeds=_sds(s, i32),
        sample_counts=_sds(s, i32), adapter_slots=_sds(t, i32), labels=_sds(t, i32),
        loss_weights=_sds(t, f32), act_index=_sds(t, i32), feed_rows=_sds(t, i32))


def abstract_job(cfg: ModelConfig, job: LoraConfig, optimizer: str = "adamw"):
    """A job's LoRA weights (float32) and its optax state over them."""
    from coserve_jax.finetune.optim import OptimizerConfig
    from coserve_jax.lora.adapter import module_shape

    params = {}
    for m in job.target_modules:
        fan_in, fan_out = module_shape(cfg, m)
        params[m] = {"a": _sds((cfg.num_layers, fan_in, job.r), jnp.float32),
                     "b": _sds((cfg.num_layers, job.r, fan_out), jnp.float32)}
    tx = OptimizerConfig(name=optimizer).build(1)
    return params, jax.eval_shape(tx.init, params)


def per_device_bytes(tree, layout) -> int:
    """Bytes one device holds of ``tree`` in ``layout`` (shards of split dimensions)."""
    sizes = {"data": layout.data_size, "model": layout.model_size}
    total = 0
    specs = jax.tree.leaves(layout.specs(tree), is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(tree), specs, strict=True):
        shape = list(leaf.shape)
        for i, axis in enumerate(spec):
            for a in (axis,) if isinstance(axis, str) else (axis or ()):
                shape[i] //= sizes[a]
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


# ----- the plan ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one deployment, and whether it fits."""

    model: str
    mesh: str
    devices: int
    device_memory: float  # bytes of one device
    usable: float  # device_memory * memory_fraction
    weights: int
    adapter_slots: int
    train_buffers: int
    optimizer_state: int  # the jobs' LoRA weights + optimizer state
    step_temp: int | None
    backward_temp: int | None
    kv_per_page: int
    page_size: int
    num_pages: int
    min_pages: int
    filled: bool = False
    """``num_pages`` was solved for: the KV pages take whatever memory is left."""
    notes: tuple[str, ...] = ()

    @property
    def temporaries(self) -> int:
        return max(self.step_temp or 0, self.backward_temp or 0)

    @property
    def fixed(self) -> int:
        """Everything but the KV pages."""
        return (self.weights + self.adapter_slots + self.train_buffers + self.optimizer_state
                + self.temporaries)

    @property
    def kv(self) -> int:
        return self.kv_per_page * self.num_pages

    @property
    def kv_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def total(self) -> int:
        return self.fixed + self.kv

    @property
    def fits(self) -> bool:
        return self.num_pages >= self.min_pages and self.total <= self.usable


def make_plan(cfg: ModelConfig, label: str, engine_config, mesh_config, *,
              device_memory_gb: float = 80.0, memory_fraction: float = 0.9,
              dtype: str = "bfloat16", jobs: int = 1, job: LoraConfig = FLEXLLM_JOB,
              compile_programs: bool = True, devices: list | None = None,
              num_pages: int | None = None) -> Plan:
    """The plan of ``engine_config`` (an ``EngineConfig``) for ``cfg`` on ``mesh_config``.

    ``num_pages`` (default ``engine_config.num_pages``) is taken as given unless it is 0,
    in which case the plan uses every page the usable memory (``device_memory_gb *
    memory_fraction``) leaves.
    Temporaries are compiled on ``devices`` (default: the first CPU devices) unless
    ``compile_programs`` is False.
    """
    from coserve_jax.engine_config import derive_lengths
    from coserve_jax.finetune.buffers import TrainBuffers
    from coserve_jax.kv_cache import KVCache
    from coserve_jax.lora.slots import AdapterSlots
    from sharding.layout import Layout
    from sharding.mesh import abstract_mesh

    ec = engine_config
    cache, adapters, ft = ec.cache, ec.adapters, ec.finetune
    num_pages = cache.num_pages if num_pages is None else num_pages
    wdtype = jnp.dtype(dtype)
    layout = Layout(abstract_mesh(mesh_config), cfg)
    lengths = derive_lengths(cfg, ec)  # as the engine derives them
    width, max_train_len = lengths.max_pages_per_seq, lengths.max_train_len
    params = abstract_params(cfg, wdtype)
    slots = jax.eval_shape(functools.partial(
        AdapterSlots.zeros, cfg, max(adapters.max_adapters, 1), adapters.max_lora_rank,
        tuple(adapters.lora_target_modules), wdtype)) if adapters.max_adapters else None
    train = jax.eval_shape(functools.partial(
        TrainBuffers.zeros, cfg, slots, ft.max_train_seqs, max_train_len, wdtype,
        groups=mesh_config.data, keep_projections=ft.keep_projections,
    )) if ft.max_train_seqs else None
    one_page = jax.eval_shape(functools.partial(KVCache.zeros, cfg, 1, cache.page_size, wdtype))
    job_bytes = 0
    if ft.max_train_seqs and jobs:
        job_params, opt_state = abstract_job(cfg, job)
        job_bytes = jobs * (per_device_bytes(job_params, layout)
                            + per_device_bytes(opt_state, layout))
    step_temp = backward_temp = None
    if compile_programs:
        step_temp, backward_temp = compiled_temporaries(
            cfg, ec, mesh_config, params, slots, train, lengths, devices)
    plan = Plan(
        model=label, mesh=mesh_config.describe(), devices=mesh_config.size,
        device_memory=device_memory_gb * GB, usable=device_memory_gb * GB * memory_fraction,
        weights=per_device_bytes(params, layout),
        adapter_slots=0 if slots is None else per_device_bytes(slots, layout),
        train_buffers=0 if train is None else per_device_bytes(train, layout),
        optimizer_state=job_bytes, step_temp=step_temp, backward_temp=backward_temp,
        kv_per_page=per_device_bytes(one_page, layout), page_size=cache.page_size,
        num_pages=num_pages,
        # Every sequence slot at full context, plus the training sequences in flight.
        min_pages=ec.buckets.max_num_seqs * width
        + ft.max_train_seqs * -(-max_train_len // cache.page_size),
        notes=tuple(layout.notes))
    if not num_pages:
        pages = int((plan.usable - plan.fixed) // plan.kv_per_page)
        plan = dataclasses.replace(plan, num_pages=max(pages, 0), filled=True)
    return plan


def compiled_temporaries(cfg: ModelConfig, ec, mesh_config, params, slots, train, lengths,
                         devices: list | None = None) -> tuple[int, int | None]:
    """Temporary bytes per device of the step (largest bucket, with finetuning tokens when
    the engine trains) and of a backward piece over the longest training sequence (its
    largest sequence bucket); ``lengths`` is ``derive_lengths(cfg, ec)``."""
    from coserve_jax.batch import TOKEN_FIELDS
    from coserve_jax.kv_cache import KVCache
    from coserve_jax.step import BackwardPiece, StepOutput, backward_piece_fn, step_fn
    from sharding.layout import Layout
    from sharding.mesh import make_mesh

    devices = devices or jax.devices("cpu")
    if len(devices) < mesh_config.size:
        raise RuntimeError(
            f"planning mesh {mesh_config.describe()} needs {mesh_config.size} devices to compile "
            f"on; {len(devices)} are available (set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={mesh_config.size} before jax starts, as "
            "`coserve plan` does)")
    mesh = make_mesh(mesh_config, devices)
    layout = Layout(mesh, cfg)
    # Two-byte stand-in for the compile (see the module docstring); shapes are unchanged.
    stand_in = jnp.float16 if devices[0].platform == "cpu" else None

    def cast(tree):
        if stand_in is None:
            return tree
        return jax.tree.map(lambda s: _sds(s.shape, stand_in) if s.dtype == jnp.bfloat16
                            else s, tree)

    params, slots, train = cast(params), cast(slots), cast(train)
    wdtype = params.embed.dtype
    # KV is donated and updated in place, so its size does not change the temporaries.
    width = lengths.max_pages_per_seq
    kv = jax.eval_shape(functools.partial(KVCache.zeros, cfg, width + 1, ec.cache.page_size,
                                          wdtype))
    with_train = train is not None
    batch = abstract_batch(lengths.token_buckets[-1], lengths.seq_buckets[-1],
                           lengths.page_buckets[-1])
    step = layout.jit_step(functools.partial(step_fn, cfg, return_logits=False,
                                             hints=layout.hints), StepOutput.specs(False),
                           TOKEN_FIELDS)
    feed = _sds((ec.buckets.max_num_seqs,), jnp.int32)
    args = (params, slots, kv, train, feed, batch)
    jitted, _ = step._jit(args)
    step_temp = jitted.lower(*args, with_train).compile().memory_analysis().temp_size_in_bytes
    backward_temp = None
    if with_train:
        seq_len = lengths.train_seq_buckets[-1]
        scalar = _sds((), jnp.int32)
        piece = BackwardPiece(act_row=scalar, layer_start=scalar, length=scalar,
                              adapter_slot=scalar)
        backward = layout.jit_backward(functools.partial(
            backward_piece_fn, cfg, attention_block=ec.finetune.backward_attention_block,
            hints=layout.hints))
        args = (params, slots, train, piece)
        jitted, _ = backward._jit(args)
        compiled = jitted.lower(*args, ec.finetune.backward_layers, seq_len).compile()
        backward_temp = compiled.memory_analysis().temp_size_in_bytes
    return step_temp, backward_temp


def check_two_byte_dots() -> None:
    """Fails unless a float16 matmul compiles on CPU without f32 temporaries."""
    a = _sds((1024, 1024), jnp.float16)
    cpu = jax.devices("cpu")[0]
    temp = (jax.jit(jnp.matmul, device=cpu).lower(a, a).compile().memory_analysis()
            .temp_size_in_bytes)
    if temp:
        raise RuntimeError(f"a float16 matmul still has {temp} bytes of temporaries on CPU: "
                           f"XLA_FLAGS lacks {CPU_NO_UPCAST_FLAG} (it must be set before jax "
                           "starts), so the temporaries would not be those of bf16")


def prepare_cpu_compiles(num_devices: int) -> None:
    """Before jax starts: ``num_devices`` virtual CPU devices and two-byte CPU dots."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_NO_UPCAST_FLAG not in flags:
        flags = f"{flags} {CPU_NO_UPCAST_FLAG}".strip()
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={num_devices}"
    os.environ["XLA_FLAGS"] = flags


# ----- report --------------------------------------------------------------------------------


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:,.2f}"


TABLE_HEADER = ("| model | mesh | weights | KV pages (tokens) | adapter slots | finetune buffers | "
                "jobs: LoRA + optimizer | step temp | backward temp | total | "
                "device (usable) | fits |")


def table(plans: list[Plan]) -> str:
    """Markdown table, GB = 1e9 bytes, one row per plan (per-device figures)."""
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for p in plans:
        lines.append(
            f"| {p.model} | {p.mesh} | {_gb(p.weights)} | {_gb(p.kv)} ({p.kv_tokens:,}) | "
            f"{_gb(p.adapter_slots)} | {_gb(p.train_buffers)} | {_gb(p.optimizer_state)} | "
            f"{_gb(p.step_temp)} | {_gb(p.backward_temp)} | {_gb(p.total)} | "
            f"{_gb(p.device_memory)} ({_gb(p.usable)}) | {'yes' if p.fits else 'NO'} |")
    return "\n".join(lines)


def verdict(p: Plan) -> str:
    """One sentence on whether the plan fits, and why not."""
    if p.fits:
        where = ("the memory left holds" if p.filled else
                 f"{_gb(p.usable - p.total)} GB of the usable memory left;")
        return (f"{p.model} on {p.mesh}: fits; {where} {p.num_pages:,} KV pages "
                f"({_gb(p.kv)} GB per device), {p.kv_tokens:,} tokens (at least "
                f"{p.min_pages * p.page_size:,} needed for every sequence at full context)")
    if p.fixed > p.usable:
        return (f"{p.model} on {p.mesh}: does NOT fit: weights, adapters, finetuning state "
                f"and temporaries alone take {_gb(p.fixed)} GB of {_gb(p.usable)} GB usable")
    return (f"{p.model} on {p.mesh}: does NOT fit: {p.num_pages:,} KV pages "
            f"({p.kv_tokens:,} tokens) where {p.min_pages:,} are needed for every sequence "
            f"slot at full context, in {_gb(p.usable)} GB usable")


def engine_config_note(ec) -> str:
    b, a, ft = ec.buckets, ec.adapters, ec.finetune
    return (f"engine: {b.max_num_batched_tokens} tokens x {b.max_num_seqs} sequences per "
            f"step, max_model_len {ec.cache.max_model_len}, page {ec.cache.page_size}, "
            f"{a.max_adapters} adapter slots of rank {a.max_lora_rank} on "
            f"{len(a.lora_target_modules)} projections, {ft.max_train_seqs} training "
            f"sequence(s) of up to {ft.max_train_len} tokens, {ft.backward_layers}-layer "
            f"backward pieces, attention block {ft.backward_attention_block}")



# ----- command line --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The options of ``coserve plan``."""
    parser.add_argument("--model", nargs="+", required=True,
                        help=f"preset ({', '.join(PRESETS)}), model directory or config.json; "
                             "several give one row each")
    parser.add_argument("--mesh", nargs="+", default=["model=1"],
                        help="mesh(es) such as model=8 or data=2,model=4, or a JSON mesh config")
    parser.add_argument("--device-memory-gb", type=float, default=80.0,
                        help="memory of one device in GB (1e9 bytes)")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of device memory the plan may fill (the rest is runtime "
                             "and fragmentation headroom; on GPUs set "
                             "XLA_PYTHON_CLIENT_MEM_FRACTION to at least this)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                                 "float32"])
    parser.add_argument("--num-pages", type=int, default=0,
                        help="KV pages per engine; 0 fills what the memory leaves")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-adapters", type=int, default=4)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-train-seqs", type=int, default=1)
    parser.add_argument("--max-train-len", type=int, default=8192)
    parser.add_argument("--backward-layers", type=int, default=1)
    parser.add_argument("--backward-attention-block", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="finetuning jobs (optimizer state)")
    parser.add_argument("--job-rank", type=int, default=16, help="LoRA rank of each job")
    parser.add_argument("--job-targets", nargs="+", default=["down_proj"],
                        help="projections each job trains (FlexLLM: down_proj)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the temporaries (state only; seconds instead of minutes)")
    parser.add_argument("--record", action="store_true",
                        help="append the table to BENCHMARKS.md (a dated section)")
    parser.add_argument("--json", help="also write the plans as JSON to this file")


def run_from_args(args) -> int:
    """``coserve plan``: prints the table and a verdict per row; exit status 1 if any row
    does not fit."""
    from sharding.mesh import MeshConfig

    meshes = [MeshConfig.parse(m) for m in args.mesh]
    if not args.no_compile:  # before anything starts jax's CPU backend
        prepare_cpu_compiles(max(m.size for m in meshes))
        jax.config.update("jax_platforms", "cpu")
        check_two_byte_dots()
    from coserve_jax.engine import EngineConfig

    ec = EngineConfig.flat(
        page_size=args.page_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank, max_train_seqs=args.max_train_seqs,
        max_train_len=args.max_train_len, backward_layers=args.backward_layers,
        backward_attention_block=args.backward_attention_block)
    job = LoraConfig(r=args.job_rank, lora_alpha=2 * args.job_rank,
                     target_modules=tuple(args.job_targets))
    plans = []
    for name in args.model:
        cfg, label = resolve_model(name)
        for mesh in meshes:
            plan = make_plan(cfg, label, ec, mesh, device_memory_gb=args.device_memory_gb,
                             memory_fraction=args.memory_fraction, dtype=args.dtype,
                             jobs=args.jobs, job=job, compile_programs=not args.no_compile,
                             num_pages=args.num_pages)
            plans.append(plan)
            print(verdict(plan), flush=True)
            for note in plan.notes:
                print(f"  note: {note}")
    body = table(plans)
    notes = [engine_config_note(ec),
             f"jobs: {args.jobs} x LoRA r={args.job_rank} on {', '.join(job.target_modules)} "
             f"({args.optimizer}, float32 weights and state)",
             "temporaries: " + ("not compiled (--no-compile)" if args.no_compile else
                                "XLA memory analysis of the sharded step and backward piece, "
                                "compiled on virtual CPU devices in float16 as a two-byte "
                                "stand-in for bfloat16 (see coserve_jax/plan.py)")]
    print("\nper device, GB = 1e9 bytes\n" + body + "\n\n" + "\n".join(f"- {n}" for n in notes))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(p) | {"fits": p.fits, "total": p.total,
                                                "kv_tokens": p.kv_tokens} for p in plans],
                      f, indent=2)
    if args.record:
        record(plans, body, notes, args)
    return 0 if all(p.fits for p in plans) else 1


def record(plans: list[Plan], body: str, notes: list[str], args) -> None:
    """Appends a dated section with the machine to BENCHMARKS.md."""
    import datetime
    import platform
    import shlex
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "BENCHMARKS.md")
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    models = ", ".join(dict.fromkeys(p.model for p in plans))
    lines = [f"\n## plan: {models} on {', '.join(args.mesh)} x "
             f"{args.device_memory_gb:g} GB devices ({stamp})\n",
             f"- machine: {cpu}, {os.cpu_count()} cores (compiles only; no accelerator used)",
             f"- versions: jax {jax.__version__}, python {platform.python_version()}",
             "- command: `coserve plan " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["plan"]
                                                      else sys.argv[1:]) + "`",
             *[f"- {n}" for n in notes],
             "- the step's temporaries are mostly the reference attention's scores (every "
             "token against every sequence's context, float32); kernels will shrink them",
             "", "Per device, GB = 1e9 bytes:", "", body, "",
             *[f"- {verdict(p)}" for p in plans], ""]
    with open(path, "a") as f:
        f.write("\n".join(lines))
    print(f"appended to {path}")
