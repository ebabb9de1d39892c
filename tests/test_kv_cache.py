"""The host-side page allocator."""

from __future__ import annotations

import pytest

from coserve_jax.kv_cache import OutOfPagesError, PageAllocator


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
