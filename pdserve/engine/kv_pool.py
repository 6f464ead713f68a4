"""Paged KV cache pool: storage plus free-page accounting.

Storage is one tensor per layer shaped ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` so
page ``p`` of layer ``l`` (its K then V) is the contiguous buffer ``layers[l][p]``; the P/D
transfer backends read and write pages through :meth:`page_view` and :meth:`page_bytes`.

With ``shared_memory=True`` (or after :meth:`KVPool.to_shared_memory`) the layer tensors live in
one shared-memory file (layers back to back), so another process on the same host can map it and
write pages directly. The file is unlinked as soon as it is created and reached through this
process's open descriptor (:attr:`KVPool.shm_path` is ``/proc/<pid>/fd/<fd>``): nothing is left
in ``/dev/shm`` however the process ends.
"""

from __future__ import annotations

import mmap
import os
import uuid
import weakref
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"


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
        shared_memory: bool = False,
        storage: bool = True,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        self.layout = KVLayout(num_layers, num_kv_heads, head_dim, page_size, str(dtype).removeprefix("torch."))
        self.device = torch.device(device)
        self.dtype = dtype
        self.shm_path: str | None = None
        if not storage:  # simulated compute: page accounting only
            self.layers: list[torch.Tensor] = []
        elif shared_memory:
            self.layers = self._shared_layers(num_layers, (num_pages, 2, page_size, num_kv_heads, head_dim), dtype)
        else:
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
        return self.layout.page_numel * self.dtype.itemsize

    def bytes_total(self) -> int:
        return self.page_bytes() * self.num_pages * len(self.layers)

    def to_shared_memory(self) -> str:
        """Move the layer tensors (contents kept) into a shared-memory file; returns its path."""
        if self.shm_path is None:
            old = self.layers
            new = self._shared_layers(len(old), tuple(old[0].shape), old[0].dtype)
            for dst, src in zip(new, old):
                dst.copy_(src)
            self.layers[:] = new  # same list object: holders of ``layers`` see the new storage
        return self.shm_path

    def _shared_layers(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        if self.device.type != "cpu":
            raise ValueError(f"a shared-memory KV pool must live on the CPU, not {self.device}")
        path = os.path.join(SHM_DIR, f"pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        layer_bytes = self.layout.page_numel * dtype.itemsize * shape[0]
        size = layer_bytes * num_layers
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(fd)
            raise
        weakref.finalize(self, os.close, fd)
        flat = torch.frombuffer(region, dtype=torch.uint8)
        flat.zero_()  # touch every page now: first touches of fresh shared memory are slow
        self.shm_path = f"/proc/{os.getpid()}/fd/{fd}"
        return [flat[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(shape) for i in range(num_layers)]

