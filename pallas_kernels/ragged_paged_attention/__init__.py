"""Attention for a ragged batch of tokens from many sequences over paged KV, and the dense
causal flash attention pair (forward + backward) the finetuning backward pieces use."""

from pallas_kernels.ragged_paged_attention.flash import flash_causal_attention
from pallas_kernels.ragged_paged_attention.kernel import (
    RaggedAttentionMetadata,
    ragged_attention_metadata,
    ragged_paged_attention,
)
from pallas_kernels.ragged_paged_attention.reference import (
    combine_kv,
    dense_causal_attention_reference,
    ragged_paged_attention_reference,
    split_kv,
    write_kv_pages,
)

__all__ = [
    "RaggedAttentionMetadata",
    "combine_kv",
    "dense_causal_attention_reference",
    "flash_causal_attention",
    "ragged_attention_metadata",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "split_kv",
    "write_kv_pages",
]
