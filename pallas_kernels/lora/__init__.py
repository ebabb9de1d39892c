"""LoRA for a batch whose tokens use different adapters (or none)."""

from pallas_kernels.lora.reference import lora_multi_slot_reference, lora_single_reference

__all__ = ["lora_multi_slot_reference", "lora_single_reference"]
