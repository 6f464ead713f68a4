"""Paged KV cache pool: storage plus free-page accounting.

Storage is one tensor per layer shaped ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` so
page ``p`` of layer ``l`` (its K then V) is the contiguous buffer ``layers[l][p]``; the P/D
transfer backends read and write pages through :meth:`page_view` and :meth:`page_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more free pages than exist."""


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on before pages can be copied between two pools."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str

    @property
    def page_numel(self) -> int:
        return 2 * self.page_size * self.num_kv_heads * self.head_dim

    def mismatch(self, other: KVLayout) -> str | None:
        """Human-readable description of the first difference, or None when compatible."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: {mine} vs {theirs}"
        return None


class KVPool:
    """Fixed-size pool of KV pages shared by all requests of one engine."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        self.layout = KVLayout(num_layers, num_kv_heads, head_dim, page_size, str(dtype).removeprefix("torch."))
        self.layers = [
            torch.zeros(num_pages, 2, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} KV pages, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(count)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise RuntimeError(f"double free of KV page {page}")
            self._used.remove(page)
            self._free.append(page)

    def check_integrity(self, expect_used: int | None = None) -> None:
        """Assert the free list and used set partition the pages exactly (for tests and debugging)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("KV free list holds a page twice")
        if free & self._used:
            raise AssertionError(f"KV pages both free and used: {sorted(free & self._used)[:8]}")
        if len(free) + len(self._used) != self.num_pages:
            raise AssertionError(
                f"KV pages lost: {self.num_pages - len(free) - len(self._used)} neither free nor used"
            )
        if expect_used is not None and len(self._used) != expect_used:
            raise AssertionError(f"expected {expect_used} used KV pages, found {len(self._used)}")

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        """The contiguous ``[2, page_size, heads, dim]`` block of one page of one layer."""
        return self.layers[layer][page]

    def page_bytes(self) -> int:
        """Bytes of one page of one layer."""
        return self.layout.page_numel * self.layers[0].element_size()

    def bytes_total(self) -> int:
        return self.page_bytes() * self.num_pages * len(self.layers)
