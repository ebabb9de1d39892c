"""The by-token jnp formulation and the shape-based chooser equal the reference."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import MIXES, assert_close, paged_batch

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.xla import (
    BY_TOKEN_MIN_SEQS,
    ragged_paged_attention_by_token,
    ragged_paged_attention_xla,
)

# (mix, query heads per kv head, kv heads, head_dim, page_size, token block)
CASES = [
    ("decode", 1, 4, 64, 8, 16),
    ("prefill", 4, 2, 128, 16, 4),
    ("mixed", 8, 1, 64, 8, 5),  # a block that does not divide the tokens
    ("mixed", 4, 2, 128, 16, 16),
    ("mixed", 1, 2, 64, 16, 64),  # one block wider than the batch
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_by_token_matches_reference(case):
    mix, g, hkv, dh, page_size, block = CASES[case]
    rng = np.random.default_rng(100 + case)
    batch = paged_batch(rng, mix, num_q_per_kv=g, num_kv_heads=hkv, head_dim=dh,
                        page_size=page_size)
    ref = ragged_paged_attention_reference(*batch.args)
    assert_close(ragged_paged_attention_by_token(*batch.args, block=block), ref)
    assert_close(ragged_paged_attention_by_token(*batch.args, 0.05, block=block),
                 ragged_paged_attention_reference(*batch.args, scale=0.05))


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_chooser_matches_reference_on_both_sides_of_the_threshold(mix):
    rng = np.random.default_rng(7)
    for extra in (1, BY_TOKEN_MIN_SEQS):  # few sequences: the reference; many: by token
        batch = paged_batch(rng, mix, num_q_per_kv=4, num_kv_heads=2, head_dim=64,
                            page_size=8, extra_seqs=extra)
        assert_close(ragged_paged_attention_xla(*batch.args),
                     ragged_paged_attention_reference(*batch.args))
