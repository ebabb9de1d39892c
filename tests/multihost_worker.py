"""One process of the multi-host test (``tests/test_sharding.py``), or its single-process
reference.

    python tests/multihost_worker.py MODEL_DIR OUT_JSON single
    python tests/multihost_worker.py MODEL_DIR OUT_JSON PROCESS_ID NUM_PROCESSES PORT MESH

The multi-process form starts ``jax.distributed`` on localhost with 4 CPU devices per
process (gloo collectives), builds the engine on the global mesh and runs the
scenario through ``run_spmd``: process 0 schedules, the others follow. The scenario
serves greedy and sampled requests (base model and an adapter) while a finetuning
job's windows share the steps, reads the LoRA gradients of its first sequence and
the weights after its optimizer step. The leader (or the single process) writes them
to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

MULTI = len(sys.argv) > 4
if MULTI:  # before jax starts its backend
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import numpy as np  # noqa: E402

import coserve_jax as cj  # noqa: E402
from coserve_jax.finetune.data import Dataset, TrainSequence  # noqa: E402
from coserve_jax.lora.config import ALL_TARGETS  # noqa: E402
from coserve_jax.runner_commands import GatherSlotGrads  # noqa: E402
from sharding import MeshConfig, make_mesh  # noqa: E402
from sharding.distributed import initialize_from_env_or_flags, run_spmd  # noqa: E402

VOCAB = 384
ENGINE = cj.EngineConfig.flat(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=32,
                              min_token_bucket=32, min_seq_bucket=4, min_page_bucket=16,
                              max_model_len=64, max_lora_rank=8, max_adapters=2, max_train_seqs=1,
                              max_train_len=32, train_window=16, backward_layers=2)


def scenario(engine) -> dict:
    cfg = engine.model.config
    adapter = cj.LoraAdapter.zeros_b("ad", cj.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=ALL_TARGETS), cfg, 1)
    rng = np.random.default_rng(1)
    adapter.b = {m: rng.normal(0, 0.05, b.shape).astype(np.float32)
                 for m, b in adapter.b.items()}
    engine.load_adapter(adapter)
    seq = TrainSequence(tuple(rng.integers(3, VOCAB, 24).tolist()), (False, *[True] * 23))
    job = cj.FinetuneJob("job", Dataset([seq, seq]),
                         lora=cj.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
                         optimizer=cj.OptimizerConfig(name="sgd", learning_rate=0.5),
                         sequences_per_step=2, max_steps=1, seed=3)
    engine.submit_job(job)
    run = engine.trainer.jobs["job"]
    requests = [(rng.integers(3, VOCAB, 7).tolist(), None, 0.0),
                (rng.integers(3, VOCAB, 18).tolist(), "ad", 0.0),
                (rng.integers(3, VOCAB, 11).tolist(), "ad", 0.9)]
    ids = [engine.add_request(p, cj.SamplingParams(max_tokens=5, ignore_eos=True,
                                                   temperature=t, seed=9), adapter=a)
           for p, a, t in requests]
    outputs, grads = {}, None
    while grads is None or len(outputs) < len(ids):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
        if grads is None and run.seqs_done:
            # Read as soon as the first sequence is done: the second's optimizer step, which
            # may come while requests still run, clears the accumulators.
            grads = engine.runner.execute(GatherSlotGrads(run.slot))  # every process joins
    while run.state == "running":
        engine.step()
    trained = engine.trained_adapter("job")
    return {"outputs": [outputs[i] for i in ids],
            "grads": {m: [g.tolist() for g in ab] for m, ab in grads.items()},
            "trained": {m: [trained.a[m].tolist(), trained.b[m].tolist()]
                        for m in trained.a},
            "mixed_steps": engine.counters["mixed_steps"]}


def main(argv: list[str]) -> None:
    model_dir, out_path, *rest = argv
    mesh = None
    if MULTI:
        pid, count, port, spec = int(rest[0]), int(rest[1]), rest[2], rest[3]
        info = initialize_from_env_or_flags(f"localhost:{port}", count, pid)
        import jax

        assert jax.device_count() == 4 * count and jax.process_index() == info.process_id
        mesh = make_mesh(MeshConfig.parse(spec))
    model = cj.load_model(model_dir, progress=False, mesh=mesh)
    engine = cj.Engine(model, ENGINE, mesh=mesh)
    result = run_spmd(engine, scenario)
    if result is not None:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
