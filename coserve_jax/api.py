"""One-call helpers over the engine, for notebooks and tests."""

from __future__ import annotations

from coserve_jax.engine import Engine, EngineConfig
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.model import Model
from coserve_jax.sampling import SamplingParams


def engine_for(model: Model, config: EngineConfig | None = None) -> Engine:
    """The engine ``generate`` uses for this model and config, built (and compiled) once."""
    config = config or EngineConfig()
    engines = model.__dict__.setdefault("_engines", {})
    if config not in engines:
        engines[config] = Engine(model, config)
    return engines[config]


def generate(
    model: Model,
    prompts: list[list[int]],
    max_tokens: int,
    engine_config: EngineConfig | None = None,
    adapter: LoraAdapter | None = None,
    **sampling,
) -> list[list[int]]:
    """New token ids for each prompt, through the engine (continuous batching, paged KV).

    ``sampling`` takes the fields of ``SamplingParams`` (temperature, top_k, top_p,
    seed, stop_token_ids, ignore_eos). ``adapter`` (a ``LoraAdapter``) is written
    into a slot of the engine under its name (replacing one of the same name).
    """
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    engine = engine_for(model, engine_config)
    if adapter is not None:
        engine.load_adapter(adapter, replace=True)
    return engine.generate(prompts, params, adapter=None if adapter is None else adapter.name)
