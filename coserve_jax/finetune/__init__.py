"""Token-level LoRA finetuning: datasets, jobs, backward pieces, optimizer, checkpoints."""
