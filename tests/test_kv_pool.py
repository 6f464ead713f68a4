"""KV page ownership: reference counts, reuse only after the last holder lets go, integrity check."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_pool import KVPool, OutOfPagesError, PageRefError


def small_pool(num_pages: int = 6) -> KVPool:
    return KVPool(num_pages, 4, num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")


def test_a_page_is_reusable_only_when_its_last_reference_is_dropped():
    pool = small_pool()
    request = pool.alloc(3)
    assert [pool.refcount(p) for p in request] == [1, 1, 1]
    pool.ref(request[:2])  # a transfer reads the first two pages
    pool.ref(request[:1])  # and a cache keeps the first
    pool.unref(request)  # the request is retracted
    assert pool.num_used == 2 and pool.num_free == 4
    fresh = pool.alloc(4)
    assert not set(fresh) & set(request[:2])  # never handed out while held
    with pytest.raises(OutOfPagesError):
        pool.alloc(1)
    pool.unref(request[:2])  # the transfer is done
    assert pool.refcount(request[0]) == 1 and pool.refcount(request[1]) == 0
    pool.check_integrity(expect_used=5)
    pool.unref(request[:1] + fresh)
    pool.check_integrity(expect_used=0)


def test_ownership_bugs_are_refused_and_leave_counts_intact():
    pool = small_pool()
    pages = pool.alloc(2)
    pool.unref(pages)
    with pytest.raises(PageRefError, match="double free"):
        pool.unref(pages[:1])
    held = pool.alloc(1)
    with pytest.raises(PageRefError, match="free"):
        pool.ref(held + [p for p in range(6) if p not in held][:1])  # the second page is free
    assert pool.refcount(held[0]) == 1  # the partial reference was rolled back
    pool.check_integrity(expect_used=1)
    with pytest.raises(AssertionError, match="expected 0 referenced"):
        pool.check_integrity(expect_used=0)


def test_integrity_check_catches_corrupted_counts():
    pool = small_pool()
    pages = pool.alloc(2)
    pool._refs[pages[0]] = 0  # lost without returning to the free list
    with pytest.raises(AssertionError, match="lost|counter"):
        pool.check_integrity()
    pool._refs[pages[0]] = -1
    with pytest.raises(AssertionError, match="negative"):
        pool.check_integrity()
    pool._refs[pages[0]] = 1
    pool._free.append(pages[1])  # free while still referenced
    with pytest.raises(AssertionError, match="both free and referenced"):
        pool.check_integrity()
