"""Paged KV cache pool: storage plus reference-counted page ownership.

Page ownership is one mechanism: every holder of a page (a request in the scheduler, a KV send
or receive in flight, the prefix cache) holds one *reference* to it. :meth:`KVPool.alloc`
hands out free pages with one reference each, :meth:`KVPool.ref` adds a holder to pages already
held, :meth:`KVPool.unref` drops one, and a page returns to the free list only when its last
reference is dropped. So a request retracted or aborted while a transfer still reads or writes
its pages leaves them allocated until the transfer lets go of them.

The prefix cache (:mod:`pdserve.engine.radix_cache`) is one more holder: it takes and drops its
reference with ``ref(pages, cache=True)`` / ``unref(pages, cache=True)``, which also marks the
page as cached, so the pool can tell pages only the cache holds (*evictable*) from pages in use
(:attr:`KVPool.num_used`). When an allocation finds too few free pages, the pool asks the cache
(its :class:`Reclaimer`) to evict least-recently-used cache-only pages first.

The engine itself is the last kind of holder: pages it keeps for its own life (the scratch page
padded decode rows write, :mod:`pdserve.engine.decode_graphs`) are taken with
``alloc(n, reserved=True)``, which flags their one reference as the engine's. Nothing else may add a
reference to a reserved page, it is never in use (:attr:`KVPool.num_used`) and never part of the
capacity requests can fill (:attr:`KVPool.capacity`).

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
from typing import Protocol

import torch

from pdserve.engine.kv_layout import KVLayout

SHM_DIR = "/dev/shm"
SHM_PREFIX = "pdserve-kv-"
SHM_TRAILER_BYTES = 4096  # after the layers: room for the owner's proof that the segment is a KV pool


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more free pages than exist."""


class PageRefError(RuntimeError):
    """A reference was added to a free page or dropped from a page nobody holds (an ownership bug)."""


class Reclaimer(Protocol):
    """What the pool needs from a cache that holds pages nobody else uses."""

    def reclaimable(self) -> int:
        """Pages the cache could give back right now."""

    def reclaim(self, count: int) -> int:
        """Drop the cache's reference to up to ``count`` pages that only it holds; returns how many."""


class KVPool:
    """Fixed-size pool of KV pages shared by all requests of one engine, with a reference count per
    page (see the module docstring). Not thread-safe: one thread (the engine's) owns the counts."""

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
        self.shm_fd: int | None = None  # this process's descriptor of the segment
        self.shm_segment: str | None = None  # random id in the segment's name
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
        self._refs: list[int] = [0] * num_pages  # holders per page; 0 exactly for the pages in _free
        self._cached = bytearray(num_pages)  # 1: one of the page's references is the prefix cache's
        self._num_referenced = 0
        self._num_cache_only = 0  # cached pages whose only reference is the cache's
        self.cache_epoch = 0  # bumped whenever a cached page gains or loses a holder (reclaimers memoise on it)
        self._reserved = bytearray(num_pages)  # 1: the page's one reference is the engine's own (alloc(reserved=True))
        self._num_reserved = 0
        self.reclaimer: Reclaimer | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages in use: referenced by a request or transfer (pages only the cache holds and pages the
        engine reserves for itself excluded)."""
        return self._num_referenced - self._num_cache_only - self._num_reserved

    @property
    def num_reserved(self) -> int:
        """Pages the engine holds for itself (``alloc(reserved=True)``)."""
        return self._num_reserved

    @property
    def capacity(self) -> int:
        """Pages requests, transfers and the cache can ever hold: all but the reserved ones."""
        return self.num_pages - self._num_reserved

    @property
    def num_cached(self) -> int:
        """Pages the prefix cache holds (in use or not)."""
        return sum(self._cached)

    @property
    def num_evictable(self) -> int:
        """Pages only the prefix cache holds."""
        return self._num_cache_only

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def is_cached(self, page: int) -> bool:
        """Whether one of the page's references is the prefix cache's."""
        return bool(self._cached[page])

    def releasable(self, holders: list[list[int]]) -> int:
        """How many distinct pages would become free or cache-only if every list in ``holders``
        dropped one reference per entry (a page counts when no other request or transfer holds it)."""
        counts: dict[int, int] = {}
        for pages in holders:
            for page in pages:
                counts[page] = counts.get(page, 0) + 1
        return sum(1 for page, n in counts.items() if self._refs[page] - self._cached[page] <= n)

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def can_alloc(self, count: int) -> bool:
        """Whether ``alloc(count)`` would succeed, counting pages the cache would evict for it."""
        if count <= len(self._free):
            return True
        if self.reclaimer is None or count > len(self._free) + self._num_cache_only:
            return False
        return count <= len(self._free) + self.reclaimer.reclaimable()

    def alloc(self, count: int, reserved: bool = False) -> list[int]:
        """Take ``count`` free pages, each with one reference: the caller's. Pages only the prefix
        cache holds are evicted first when too few are free. With ``reserved`` the caller is the
        engine itself, holding the pages for its own use (see the module docstring)."""
        if count > len(self._free) and self.reclaimer is not None:
            self.reclaimer.reclaim(count - len(self._free))
        if count > len(self._free):
            raise OutOfPagesError(
                f"asked for {count} KV pages, {len(self._free)} free of {self.num_pages} "
                f"({self._num_cache_only} held only by the prefix cache)"
            )
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        self._num_referenced += count
        if reserved:
            for page in pages:
                self._reserved[page] = 1
            self._num_reserved += count
        return pages

    def ref(self, pages: list[int], cache: bool = False) -> None:
        """Add one holder to each of ``pages``; they must already be held (allocated). With ``cache``
        the holder is the prefix cache (at most one cache reference per page)."""
        refs, cached = self._refs, self._cached
        self.cache_epoch += cache or any(cached[page] for page in pages)
        for i, page in enumerate(pages):
            if refs[page] <= 0 or (cache and cached[page]) or self._reserved[page]:
                self._rollback_ref(pages[:i], cache)
                why = ("which is free" if refs[page] <= 0 else "which the engine reserves for itself"
                       if self._reserved[page] else "which the cache already holds")
                raise PageRefError(f"reference to KV page {page}, {why}")
            if refs[page] == 1 and cached[page]:
                self._num_cache_only -= 1
            refs[page] += 1
            if cache:
                cached[page] = 1

    def _rollback_ref(self, pages: list[int], cache: bool) -> None:
        for page in pages:
            self._refs[page] -= 1
            if cache:
                self._cached[page] = 0
            elif self._refs[page] == 1 and self._cached[page]:
                self._num_cache_only += 1

    def unref(self, pages: list[int], cache: bool = False, reserved: bool = False) -> None:
        """Drop one holder from each of ``pages``; a page nobody holds any more becomes free. With
        ``cache`` the holder dropping out is the prefix cache; with ``reserved``, the engine itself."""
        refs, cached = self._refs, self._cached
        self.cache_epoch += cache or any(cached[page] for page in pages)
        for page in pages:
            if refs[page] <= 0:
                raise PageRefError(f"KV page {page} released more often than it was referenced (double free)")
            if reserved != bool(self._reserved[page]):
                raise PageRefError(f"KV page {page} released as the engine's reserved page, which it is not"
                                   if reserved else f"KV page {page} released by a holder, but the engine reserves it")
            if reserved:
                self._reserved[page] = 0
                self._num_reserved -= 1
            if cache:
                if not cached[page]:
                    raise PageRefError(f"KV page {page} released by the cache, which does not hold it")
                cached[page] = 0
                if refs[page] == 1:
                    self._num_cache_only -= 1
            elif cached[page] and refs[page] == 1:
                raise PageRefError(f"KV page {page} released by a request while only the cache holds it")
            refs[page] -= 1
            if refs[page] == 0:
                self._free.append(page)
                self._num_referenced -= 1
            elif refs[page] == 1 and cached[page]:
                self._num_cache_only += 1

    def check_integrity(self, expect_used: int | None = None) -> None:
        """Assert the reference counts are consistent (for tests and debugging): no negative count,
        every page either free (count 0, on the free list once) or referenced, never both, every
        cached page referenced, every reserved page held by the engine alone; with ``expect_used``,
        that exactly that many pages are in use (referenced by a holder other than the cache and the
        engine's reservation: cached, unreferenced pages are fine)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("KV free list holds a page twice")
        negative = [p for p, n in enumerate(self._refs) if n < 0]
        if negative:
            raise AssertionError(f"KV pages with a negative reference count: {negative[:8]}")
        referenced = {p for p, n in enumerate(self._refs) if n > 0}
        if free & referenced:
            raise AssertionError(f"KV pages both free and referenced: {sorted(free & referenced)[:8]}")
        if len(free) + len(referenced) != self.num_pages:
            lost = sorted(set(range(self.num_pages)) - free - referenced)
            raise AssertionError(f"KV pages lost (neither free nor referenced): {lost[:8]}")
        if len(referenced) != self._num_referenced:
            raise AssertionError(f"KV used-page counter says {self._num_referenced}, {len(referenced)} are referenced")
        cached = {p for p, flag in enumerate(self._cached) if flag}
        if cached - referenced:
            raise AssertionError(f"KV pages cached but free: {sorted(cached - referenced)[:8]}")
        cache_only = {p for p in cached if self._refs[p] == 1}
        if len(cache_only) != self._num_cache_only:
            raise AssertionError(f"KV cache-only counter says {self._num_cache_only}, {len(cache_only)} are")
        reserved = {p for p, flag in enumerate(self._reserved) if flag}
        if len(reserved) != self._num_reserved:
            raise AssertionError(f"KV reserved-page counter says {self._num_reserved}, {len(reserved)} are")
        shared = sorted(p for p in reserved if self._refs[p] != 1 or self._cached[p])
        if shared:
            raise AssertionError(f"KV pages reserved by the engine but free or held by others too: {shared[:8]}")
        in_use = len(referenced) - len(cache_only) - len(reserved)
        if expect_used is not None and in_use != expect_used:
            raise AssertionError(
                f"expected {expect_used} referenced KV pages, found {in_use} (plus {len(cache_only)} only cached, "
                f"{len(reserved)} reserved by the engine)"
            )

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
        segment = uuid.uuid4().hex[:24]
        path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}-{segment}")
        layer_bytes = self.layout.page_numel * dtype.itemsize * shape[0]
        size = layer_bytes * num_layers + SHM_TRAILER_BYTES
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
        self.shm_fd, self.shm_segment = fd, segment
        return [flat[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(shape) for i in range(num_layers)]

