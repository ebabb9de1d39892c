"""A training process for the durability test: trains one job to completion, checkpointing.

Usage: python train_worker.py CHECKPOINT_DIR EXPORT_DIR STEPS
"""

from __future__ import annotations

import sys

import coserve_jax as cj
from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraConfig, OptimizerConfig
from coserve_jax.finetune.data import DataConfig, from_records, synthetic_task


def main(checkpoint_dir: str, export_dir: str, steps: int) -> None:
    model = cj.load_model(cj.tiny_model_dir(), progress=False)
    data = from_records(synthetic_task("reverse", 64, seed=3), model.tokenizer,
                        DataConfig(max_seq_len=64))
    engine = Engine(model, EngineConfig.flat(max_num_seqs=4, max_num_batched_tokens=64,
                                             max_model_len=128, max_train_seqs=2, train_window=16,
                                             backward_layers=2, backward_pieces_per_step=2))
    job = FinetuneJob("durable", data, lora=LoraConfig(r=4, lora_alpha=8),
                      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine",
                                                warmup_steps=3),
                      sequences_per_step=2, max_steps=steps, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=2, export_dir=export_dir, seed=11)
    start = engine.submit_job(job)
    print(f"started at step {start.step}", flush=True)
    while engine.job_progress("durable").state == "running":
        engine.step()
    print(f"finished at step {engine.job_progress('durable').step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
