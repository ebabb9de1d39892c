"""The host-side page allocator and the device-side cache layout."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.kv_cache import KVCache, OutOfPagesError, PageAllocator
from pallas_kernels.ragged_paged_attention import write_kv_pages


def test_grow_free_and_usage():
    alloc = PageAllocator(num_pages=10, page_size=4, max_pages_per_seq=6)
    a = alloc.grow("a", 5)
    assert len(a) == 2
    assert alloc.grow("a", 8) == a and len(a) == 2  # still fits in two pages
    alloc.grow("a", 9)
    b = alloc.grow("b", 12)
    assert len(b) == 3 and not set(a) & set(b)
    usage = alloc.usage()
    assert (usage.used_pages, usage.free_pages, usage.num_sequences) == (6, 4, 2)
    alloc.free("a")
    assert alloc.usage().used_pages == 3
    alloc.free("unknown")  # no-op
    assert alloc.usage().num_sequences == 1


def test_out_of_pages_leaves_state_unchanged():
    alloc = PageAllocator(num_pages=4, page_size=4, max_pages_per_seq=4)
    alloc.grow("a", 12)
    assert not alloc.can_grow("b", 8)
    with pytest.raises(OutOfPagesError):
        alloc.grow("b", 8)
    assert alloc.usage().num_sequences == 1 and alloc.usage().free_pages == 1
    assert alloc.can_grow("b", 4)


def test_request_that_never_fits():
    alloc = PageAllocator(num_pages=8, page_size=4, max_pages_per_seq=4)
    alloc.check_fits(16)
    with pytest.raises(ValueError, match=r"never|at most"):
        alloc.check_fits(17)


def test_cache_layout_is_the_tpu_kernels_combined_heads():
    """``KVCache`` is one ``[L, P, page, 2 * Hkv, Dh]`` array; ``write_kv_pages`` puts K of
    head h at ``2h`` and V at ``2h + 1`` of the token's slot in the given layer, and drops
    padding slots."""
    cfg = types.SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=4)  # what zeros reads
    kv = KVCache.zeros(cfg, num_pages=5, page_size=4, dtype=jnp.float32)
    assert kv.pages.shape == (3, 5, 4, 4, 4) and (kv.num_pages, kv.page_size) == (5, 4)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 2, 4)).astype(np.float32)
    v = rng.standard_normal((3, 2, 4)).astype(np.float32)
    slots = jnp.asarray([9, 2, -1], jnp.int32)  # page 2 offset 1, page 0 offset 2, padding
    pages = np.asarray(write_kv_pages(kv.pages, jnp.asarray(k), jnp.asarray(v), slots,
                                      jnp.int32(1)))
    for t, (page, offset) in enumerate([(2, 1), (0, 2)]):
        np.testing.assert_array_equal(pages[1, page, offset, 0::2], k[t])
        np.testing.assert_array_equal(pages[1, page, offset, 1::2], v[t])
    assert np.count_nonzero(pages) == 2 * 2 * 2 * 4  # nothing else written (padding dropped)
