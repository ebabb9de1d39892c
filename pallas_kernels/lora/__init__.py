"""LoRA for a batch whose tokens use different adapters (or none)."""

from pallas_kernels.lora.kernel import (
    TokenGroups,
    group_tokens,
    lora_grouped,
    lora_multi_slot,
    lora_ragged_dot,
)
from pallas_kernels.lora.reference import lora_multi_slot_reference, lora_single_reference

__all__ = [
    "TokenGroups",
    "group_tokens",
    "lora_grouped",
    "lora_multi_slot",
    "lora_multi_slot_reference",
    "lora_ragged_dot",
    "lora_single_reference",
]
