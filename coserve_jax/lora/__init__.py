"""LoRA adapters: configuration, weights, PEFT-format I/O and the slot table of the step."""
