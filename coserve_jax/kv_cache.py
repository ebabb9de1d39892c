"""Paged KV cache: device arrays of pages and the host-side page allocator.

The device side is one array ``[L, P, page_size, 2 * Hkv, Dh]`` with K and V
combined on the head axis (K of kv head ``h`` at ``2h``, V at ``2h + 1``): the
layout jax's TPU ragged paged attention kernel reads, so it gets the cache
itself, and the one every other attention path reads too
(``pallas_kernels.ragged_paged_attention.reference``). The step donates it and
writes new tokens in place. The host side decides which pages each sequence
owns; page tables are plain lists until a ``TokenBatch`` packs them.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from coserve_jax.config import ModelConfig
from coserve_jax.errors import InvalidRequest


@flax.struct.dataclass
class KVCache:
    """Key and value pages of every layer, combined on the head axis."""

    pages: jax.Array  # [L, P, page_size, 2 * Hkv, Dh]: K of head h at 2h, V at 2h + 1

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
        shape = (cfg.num_layers, num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        return cls(pages=jnp.zeros(shape, dtype))

    @property
    def num_pages(self) -> int:
        return self.pages.shape[1]

    @property
    def page_size(self) -> int:
        return self.pages.shape[2]


class OutOfPagesError(RuntimeError):
    """Not enough free pages right now (the caller may preempt and retry)."""


@dataclasses.dataclass(frozen=True)
class KVUsage:
    """A snapshot of page usage."""

    total_pages: int
    used_pages: int
    page_size: int
    num_sequences: int

    @property
    def free_pages(self) -> int:
        return self.total_pages - self.used_pages

    @property
    def fraction_used(self) -> float:
        return self.used_pages / self.total_pages


class PageAllocator:
    """Hands out pages to sequences; each sequence owns an ordered page table."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        # Pop from the end: low page numbers are handed out first.
        self._free = list(range(num_pages - 1, -1, -1))
        self._tables: dict[object, list[int]] = {}

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def check_fits(self, num_tokens: int) -> None:
        """Raises ``ValueError`` if ``num_tokens`` could never be held, even by an empty cache."""
        need = self.pages_for(num_tokens)
        if need > self.num_pages or need > self.max_pages_per_seq:
            raise InvalidRequest(
                f"a sequence of {num_tokens} tokens needs {need} KV pages of "
                f"{self.page_size} tokens; the cache has {self.num_pages} pages and a sequence "
                f"may hold at most {self.max_pages_per_seq}"
            )

    def can_grow(self, seq_id: object, num_tokens: int) -> bool:
        """Whether ``seq_id`` could be grown to hold ``num_tokens`` tokens right now."""
        have = len(self._tables.get(seq_id, ()))
        return self.pages_for(num_tokens) - have <= len(self._free)

    def grow(self, seq_id: object, num_tokens: int) -> list[int]:
        """Makes ``seq_id`` own enough pages for ``num_tokens``; returns its page table."""
        table = self._tables.setdefault(seq_id, [])
        need = self.pages_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self._tables[seq_id]
            raise OutOfPagesError(f"need {need} more pages, {len(self._free)} free")
        if len(table) + max(need, 0) > self.max_pages_per_seq:
            raise ValueError(f"sequence would exceed {self.max_pages_per_seq} pages")
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: object) -> None:
        """Returns every page of ``seq_id`` (a no-op for an unknown id)."""
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def page_table(self, seq_id: object) -> list[int]:
        return self._tables[seq_id]

    def usage(self) -> KVUsage:
        return KVUsage(
            total_pages=self.num_pages,
            used_pages=self.num_pages - len(self._free),
            page_size=self.page_size,
            num_sequences=len(self._tables),
        )
