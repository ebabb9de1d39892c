"""Kernels of the co-serving step, each beside the plain-jnp reference that defines it.

This package depends only on jax. The public API (also what notebooks use):

- ``ragged_paged_attention(q, kv_pages, page_tables, seq_ids, positions,
  interpret=...)`` and its reference ``ragged_paged_attention_reference``, over the
  combined cache ``kv_pages [P, page_size, 2 * Hkv, Dh]`` (K of head h at 2h, V at
  2h + 1; ``combine_kv``/``split_kv`` convert); ``ragged_attention_metadata`` computes
  the block layout once per batch;
- ``flash_causal_attention(q, k, v, interpret=...)`` (differentiable) and its reference
  ``dense_causal_attention_reference``;
- ``group_tokens(slot_ids, num_slots, tile)`` + ``lora_grouped(x, a, b, scale, groups)``
  (differentiable), the drop-in ``lora_multi_slot`` and the reference
  ``lora_multi_slot_reference``; ``lora_ragged_dot`` for comparison;
- ``select_kernels(impl)`` -> ``Kernels``: what a step uses ("auto" | "kernel" |
  "reference" | "interpret").
"""

from pallas_kernels.dispatch import KernelOptions, Kernels, select_kernels
from pallas_kernels.lora import (
    TokenGroups,
    group_tokens,
    lora_grouped,
    lora_multi_slot,
    lora_multi_slot_reference,
    lora_ragged_dot,
    lora_single_reference,
)
from pallas_kernels.ragged_paged_attention import (
    RaggedAttentionMetadata,
    combine_kv,
    dense_causal_attention_reference,
    flash_causal_attention,
    ragged_attention_metadata,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    split_kv,
    write_kv_pages,
)

__all__ = [
    "KernelOptions",
    "Kernels",
    "RaggedAttentionMetadata",
    "TokenGroups",
    "combine_kv",
    "dense_causal_attention_reference",
    "flash_causal_attention",
    "group_tokens",
    "lora_grouped",
    "lora_multi_slot",
    "lora_multi_slot_reference",
    "lora_ragged_dot",
    "lora_single_reference",
    "ragged_attention_metadata",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "select_kernels",
    "split_kv",
    "write_kv_pages",
]
