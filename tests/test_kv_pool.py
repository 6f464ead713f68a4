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


def test_reserved_pages_are_held_apart_from_pages_in_use():
    """The engine's own pages (``alloc(reserved=True)``, e.g. the decode graphs' scratch page) are
    neither in use nor capacity; no other holder may reference or release them; integrity checks them."""
    pool = small_pool()
    scratch = pool.alloc(1, reserved=True)
    assert pool.num_used == 0 and pool.num_reserved == 1 and pool.capacity == 5 and pool.num_free == 5
    pool.check_integrity(expect_used=0)
    request = pool.alloc(5)
    assert pool.num_used == 5 and not pool.can_alloc(1)
    with pytest.raises(PageRefError, match="reserves"):
        pool.ref(request[:2] + scratch)  # a holder may not share it; the partial reference is rolled back
    with pytest.raises(PageRefError, match="the engine reserves it"):
        pool.unref(scratch)
    with pytest.raises(PageRefError, match="which it is not"):
        pool.unref(request[:1], reserved=True)
    pool.check_integrity(expect_used=5)
    pool.unref(request)
    pool.unref(scratch, reserved=True)
    assert pool.num_free == 6 and pool.capacity == 6
    pool.check_integrity(expect_used=0)
    held = pool.alloc(1, reserved=True)
    pool._refs[held[0]] = 2  # corrupted: someone else holds it too
    with pytest.raises(AssertionError, match="reserved by the engine but"):
        pool.check_integrity()


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
