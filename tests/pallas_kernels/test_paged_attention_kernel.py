"""The ragged paged attention kernel against its jnp reference (Pallas interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from kernel_cases import MIXES, assert_close, paged_batch

from pallas_kernels.ragged_paged_attention import (
    combine_kv,
    ragged_attention_metadata,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention.kernel import max_query_blocks


def test_interpreter_poisons_unwritten_outputs():
    """The premise of every "all finite" check here: in interpret mode an output element
    the kernel never writes comes back NaN."""

    def half(o_ref):
        o_ref[:4] = jnp.ones((4,), jnp.float32)

    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)()
    assert np.isfinite(np.asarray(out)).tolist() == [True] * 4 + [False] * 4


# (mix, query heads per kv head, kv heads, head_dim, page_size, block_q, pages_per_block);
# None block sizes take the defaults. Together: GQA 1/4/8, head sizes 64/128, pages 8/16.
CASES = [
    ("mixed", 1, 2, 64, 8, 4, 2),
    ("mixed", 4, 2, 128, 16, 2, 1),
    ("mixed", 8, 1, 64, 16, None, None),
    ("decode", 4, 2, 64, 8, None, None),
    ("prefill", 8, 1, 128, 8, 4, 4),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(case):
    mix, g, hkv, dh, page_size, block_q, ppb = CASES[case]
    rng = np.random.default_rng(case)
    batch = paged_batch(rng, mix, num_q_per_kv=g, num_kv_heads=hkv, head_dim=dh,
                        page_size=page_size)
    ref = ragged_paged_attention_reference(*batch.args)
    out = ragged_paged_attention(*batch.args, block_q=block_q, pages_per_block=ppb,
                                 interpret=True)
    assert_close(out, ref)


def test_stacked_cache_with_layer_index_and_precomputed_metadata():
    """``layer=`` reads one layer of the stacked ``[L, P, ...]`` cache (no copy) and a
    metadata computed once gives the same result."""
    rng = np.random.default_rng(7)
    batch = paged_batch(rng, "mixed", num_q_per_kv=4, num_kv_heads=2, head_dim=64,
                        page_size=8)
    num_pages, page_size, hkv2, dh = batch.kv_pages.shape
    other = jnp.asarray(rng.standard_normal((num_pages, page_size, hkv2 // 2, dh), np.float32))
    kv_all = jnp.stack([combine_kv(other, other), batch.kv_pages, combine_kv(other, -other)])
    meta = ragged_attention_metadata(batch.seq_ids, batch.positions, batch.page_tables,
                                     block_q=8, pages_per_block=2)
    out = ragged_paged_attention(batch.q, kv_all, *batch.args[2:], layer=jnp.int32(1),
                                 metadata=meta, pages_per_block=2, interpret=True)
    assert_close(out, ragged_paged_attention_reference(*batch.args))


def test_non_power_of_two_group_and_custom_scale():
    """GQA groups that are not powers of two are padded inside (Qwen2.5-7B has 7)."""
    rng = np.random.default_rng(3)
    batch = paged_batch(rng, "mixed", num_q_per_kv=3, num_kv_heads=2, head_dim=64,
                        page_size=16)
    ref = ragged_paged_attention_reference(*batch.args, scale=0.05)
    out = ragged_paged_attention(*batch.args, 0.05, block_q=8, interpret=True)
    assert_close(out, ref)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("block_q", [1, 4, 16])
def test_metadata_layout(mix, block_q):
    """Every token gets its own row, a block holds one sequence only, and the fixed
    block count suffices."""
    rng = np.random.default_rng(0)
    batch = paged_batch(rng, mix, num_q_per_kv=1, num_kv_heads=1, head_dim=8, page_size=4)
    meta = jax.tree.map(np.asarray, ragged_attention_metadata(
        batch.seq_ids, batch.positions, batch.page_tables, block_q=block_q,
        pages_per_block=2))
    t = batch.seq_ids.shape[0]
    seq, pos = np.asarray(batch.seq_ids), np.asarray(batch.positions)
    nb = max_query_blocks(t, batch.page_tables.shape[0], block_q)
    assert meta.kv_len.shape == (nb,)
    assert len(set(meta.dest.tolist())) == t and meta.dest.max() < nb * block_q
    np.testing.assert_array_equal(meta.src[meta.dest], np.arange(t))
    np.testing.assert_array_equal(meta.row_pos[meta.dest], pos)
    for blk in range(nb):
        toks = meta.src[blk * block_q:(blk + 1) * block_q]
        toks = toks[toks < t]
        assert len(set(seq[toks].tolist())) <= 1
        if len(toks):
            assert meta.kv_len[blk] == pos[toks].max() + 1
            np.testing.assert_array_equal(
                meta.block_tables[blk, : batch.page_tables.shape[1]],
                np.asarray(batch.page_tables)[seq[toks[0]]])
        else:
            assert meta.kv_len[blk] == 0

