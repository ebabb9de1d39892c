"""EngineConfig in parts: validation, flat names, derived lengths, the latency-model key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coserve_jax import (
    BucketConfig,
    CacheConfig,
    Engine,
    EngineConfig,
    FinetuneConfig,
    KernelConfig,
    SchedulingConfig,
    TelemetryConfig,
)
from coserve_jax.engine_config import FLAT_FIELDS, derive_lengths

from support import tiny_model

# The fields of the single-level EngineConfig of old, each a flat name now.
OLD_FLAT_NAMES = (  # and the names at the end: added since
    "page_size", "num_pages", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "min_token_bucket", "min_seq_bucket", "min_page_bucket", "compilation_cache_dir",
    "max_adapters", "max_lora_rank", "lora_target_modules", "max_train_seqs", "max_train_len",
    "train_window", "backward_layers", "backward_pieces_per_step", "backward_attention_block",
    "backward_block", "mode", "spend_banked_slack", "default_ttft_s", "default_tpot_s",
    "max_waiting", "admission_control", "latency_model_dir", "run_dir", "log_every", "kernels",
    "overlap_host", "idle_whole_samples", "safety", "banked_reserve", "slot_headroom",
    "slo_prefill_chunks", "keep_projections", "finetune_unit", "dense_lora", "skip_unused_lora",
    "unroll_layers", "xla_options", "sample_segments", "cheapest_bucket",
    "sample_credit_cap")
SMALL = EngineConfig.flat(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16,
                          min_token_bucket=8, min_seq_bucket=2, max_model_len=128,
                          max_lora_rank=8, max_train_seqs=1, max_train_len=64)


def test_flat_names_map_to_parts():
    assert set(FLAT_FIELDS) == set(OLD_FLAT_NAMES)
    config = EngineConfig.flat(page_size=4, max_num_seqs=8, kernels="reference", mode="temporal:4",
                               run_dir="runs", compilation_cache_dir="/tmp/xla")
    assert config.cache == CacheConfig(page_size=4)
    assert config.buckets == BucketConfig(max_num_seqs=8)
    assert config.kernels == KernelConfig(impl="reference", compilation_cache_dir="/tmp/xla")
    assert config.scheduling == SchedulingConfig(mode="temporal:4")
    assert config.telemetry == TelemetryConfig(run_dir="runs")
    assert EngineConfig.flat() == EngineConfig()
    changed = config.replace(num_pages=64, backward_layers=2)
    assert changed.cache == CacheConfig(page_size=4, num_pages=64)
    assert changed.finetune == FinetuneConfig(backward_layers=2)
    assert changed.buckets is config.buckets and config.cache.num_pages == 512
    with pytest.raises(TypeError, match="'pages'"):
        EngineConfig.flat(pages=4)
    with pytest.raises(TypeError, match="'impl'"):
        config.replace(impl="reference")  # the flat name is `kernels`


def test_parts_validate_their_fields():
    with pytest.raises(ValueError, match=r"CacheConfig\.page_size must be a positive integer"):
        CacheConfig(page_size=0)
    with pytest.raises(ValueError, match=r"BucketConfig\.min_seq_bucket must be a positive"):
        EngineConfig.flat(min_seq_bucket=0)
    with pytest.raises(ValueError, match=r"FinetuneConfig\.backward_block must be an integer >= 0"):
        FinetuneConfig(backward_block=-1)
    with pytest.raises(ValueError, match=r"keep_projections needs whole-sequence backward"):
        FinetuneConfig(keep_projections=True, backward_block=16)
    with pytest.raises(ValueError, match=r"AdapterSlotsConfig\.max_adapters"):
        EngineConfig.flat(max_adapters=-1)
    with pytest.raises(ValueError, match=r"TelemetryConfig\.log_every"):
        TelemetryConfig(log_every=0)
    with pytest.raises(ValueError, match="mode"):
        SchedulingConfig(mode="both")
    with pytest.raises(ValueError, match="SLO"):
        SchedulingConfig(default_tpot_s=0.0)
    with pytest.raises(ValueError, match=r"safety must be in \(0, 1\]"):
        EngineConfig.flat(safety=1.5)
    with pytest.raises(ValueError, match="banked_reserve must be >= 0"):
        EngineConfig.flat(banked_reserve=-0.5)
    # Across parts.
    with pytest.raises(ValueError, match="needs max_adapters > 0"):
        EngineConfig.flat(max_adapters=0)
    EngineConfig.flat(max_adapters=0, max_train_seqs=0)
    with pytest.raises(ValueError, match=r"max_num_seqs cannot exceed max_num_batched_tokens"):
        EngineConfig.flat(max_num_seqs=32, max_num_batched_tokens=16)
    with pytest.raises(TypeError, match=r"EngineConfig\.cache must be a CacheConfig"):
        EngineConfig(cache=BucketConfig())


def test_configs_serialize():
    record = json.loads(json.dumps(dataclasses.asdict(SMALL)))
    assert record["cache"]["page_size"] == 4 and record["kernels"]["impl"] == "auto"


def test_derived_lengths_are_the_engines():
    model = tiny_model()
    engine = Engine(model, SMALL)
    lengths = derive_lengths(model.config, SMALL)
    assert engine.lengths == lengths
    assert (lengths.max_model_len, lengths.max_pages_per_seq, lengths.max_train_len) == (
        128, 32, 64)
    assert lengths.token_buckets == (8, 16) and lengths.seq_buckets == (2, 4)
    assert lengths.page_buckets == (8, 16, 32)
    assert sorted({b.num_tokens for b in engine.buckets}) == list(lengths.token_buckets)
    assert sorted({b.num_seqs for b in engine.buckets}) == list(lengths.seq_buckets)
    assert sorted({b.num_pages for b in engine.buckets}) == list(lengths.page_buckets)
    assert engine.trainer.seq_buckets == lengths.train_seq_buckets == (16, 32, 64)
    # Defaults: min(model limit, 2048) and min(512, max_model_len).
    default = derive_lengths(model.config, EngineConfig())
    assert default.max_model_len == min(model.config.max_position_embeddings, 2048)
    assert default.max_train_len == min(512, default.max_model_len)
    with pytest.raises(ValueError, match=r"max_train_len \(1\) must be in \[2, model length"):
        derive_lengths(model.config, SMALL.replace(max_train_len=1))
    derive_lengths(model.config, SMALL.replace(max_train_len=1, max_train_seqs=0))


def test_latency_key_is_the_shape_parts_only(tmp_path):
    model = tiny_model()
    base = SMALL.replace(latency_model_dir=str(tmp_path))
    path = Engine(model, base).latency_path
    same = base.replace(mode="temporal:4", spend_banked_slack=False, default_ttft_s=2.0,
                        default_tpot_s=0.5, max_waiting=7, admission_control=False,
                        log_every=3, run_dir=None, compilation_cache_dir=str(tmp_path / "xla"))
    assert Engine(model, same).latency_path == path
    for shape in ({"min_token_bucket": 16}, {"num_pages": 32}, {"max_lora_rank": 4},
                  {"backward_layers": 2}):
        assert Engine(model, base.replace(**shape)).latency_path != path, shape
