"""Attention for a ragged batch of tokens from many sequences over paged KV."""

from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_pages,
)

__all__ = ["ragged_paged_attention_reference", "write_kv_pages"]
