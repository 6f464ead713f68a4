"""Radix prefix cache over token ids, page-granular, holding its pages through the pool's references.

One node per full KV page: a node's key is the page's ``page_size`` token ids, its path from the
root is the prefix the page's KV was computed for. The cache holds one reference to each page in
the tree (``KVPool.ref(..., cache=True)``), so a page stays valid after the request that computed
it has finished; a request reusing a prefix adds its own references to the matched pages. Pages
in the tree are full and were computed before insertion, so nobody writes them again: sharing
them between requests, and reading them for a P/D transfer, is safe.

Eviction (asked by the pool when an allocation finds too few free pages) drops the cache's
reference to least-recently-used leaves that nobody else holds, then to their parents as they
become such leaves; a page any request or transfer holds is never evicted. The evictable leaves
(a heap by last access) and the count of reclaimable pages come from one walk of the tree, kept
until a cached page's holders change (``KVPool.cache_epoch``): under KV pressure every decode row's
page allocation evicts, and a walk per allocation made each step cost O(rows x cached pages).

Every store and eviction is recorded as a KV event (:mod:`pdserve.kv_events`) with the
page's chained hash, for schedulers outside the engine; :meth:`RadixCache.drain_events` hands
them over.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from pdserve.engine.kv_pool import KVPool
from pdserve.kv_events import (
    ROOT_HASH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    page_hash,
)

MAX_PENDING_EVENTS = 100_000  # events nobody drains are dropped oldest first beyond this


class _Node:
    __slots__ = ("key", "page", "hash", "parent", "children", "last_access")

    def __init__(self, key: tuple[int, ...], page: int, hash_: int, parent: _Node | None) -> None:
        self.key = key
        self.page = page
        self.hash = hash_
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_access = 0


class RadixCache:
    """Prefix cache of one engine's KV pool; registers itself as the pool's reclaimer. Not
    thread-safe: the engine thread owns it."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = _Node((), -1, ROOT_HASH, None)
        self._clock = itertools.count(1)
        self.num_pages = 0
        self.events: list[CacheEvent] = []
        self.num_stored = 0  # pages ever stored
        self.num_evicted = 0  # pages ever evicted
        self._memo_epoch = -1  # pool.cache_epoch that _leaf_heap and _num_reclaimable describe
        self._leaf_heap: list[tuple[int, int, _Node]] = []
        self._num_reclaimable = 0
        pool.reclaimer = self

    # ------------------------------------------------------------------ lookup and insertion
    def match(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Pages of the longest cached prefix of ``token_ids`` covering at most ``max_tokens``
        tokens (whole pages). The caller must ``pool.ref`` them before anything else can evict."""
        ps = self.page_size
        node, pages, stamp = self.root, [], next(self._clock)
        for i in range(max(0, max_tokens) // ps):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            child.last_access = stamp
            pages.append(child.page)
            node = child
        return pages

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Cache the full pages of ``token_ids`` (whose KV is in ``pages``, in order); a prefix
        already cached keeps its pages. Returns how many pages were newly stored."""
        ps = self.page_size
        count = min(len(token_ids) // ps, len(pages))
        node, stamp = self.root, next(self._clock)
        created: list[_Node] = []
        for i in range(count):
            key = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(key)
            if child is None:
                child = _Node(key, pages[i], page_hash(node.hash, key), node)
                node.children[key] = child
                created.append(child)
            child.last_access = stamp
            node = child
        if created:
            self.pool.ref([n.page for n in created], cache=True)
            self.num_pages += len(created)
            self.num_stored += len(created)
            parent = created[0].parent
            self._record(BlockStored(
                [n.hash for n in created],
                None if parent is self.root else parent.hash,
                [t for n in created for t in n.key],
                ps,
            ))
        return len(created)

    # ------------------------------------------------------------------ eviction
    def reclaimable(self) -> int:
        """Pages eviction could free now: nodes whose whole subtree only the cache holds."""
        self._refresh()
        return self._num_reclaimable

    def reclaim(self, count: int) -> int:
        """Evict up to ``count`` least-recently-used pages nobody but the cache holds."""
        self._refresh()
        refcount, heap = self.pool.refcount, self._leaf_heap
        evicted: list[_Node] = []
        while heap and len(evicted) < count:
            stamp, _, node = heapq.heappop(heap)
            if node.last_access != stamp:  # touched by a lookup since the walk: requeue at its new age
                heapq.heappush(heap, (node.last_access, id(node), node))
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            evicted.append(node)
            if parent is not self.root and not parent.children and refcount(parent.page) == 1:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if evicted:
            self.pool.unref([n.page for n in evicted], cache=True)
            self.num_pages -= len(evicted)
            self.num_evicted += len(evicted)
            self._record(BlockRemoved([n.hash for n in evicted]))
            self._num_reclaimable -= len(evicted)  # only reclaimable pages were evicted; the heap stays true
            self._memo_epoch = self.pool.cache_epoch
        return len(evicted)

    def _refresh(self) -> None:
        """Rebuild the evictable-leaf heap and the reclaimable count if a cached page's holders changed."""
        if self._memo_epoch == self.pool.cache_epoch:
            return
        refcount = self.pool.refcount
        blocked: set[int] = set()  # ids of nodes whose subtree holds a page someone else uses
        total = 0
        leaves: list[tuple[int, int, _Node]] = []
        for node in reversed(self._nodes()):  # children before their parents
            if refcount(node.page) == 1 and id(node) not in blocked:
                total += 1
                if not node.children:
                    leaves.append((node.last_access, id(node), node))
            elif node.parent is not None:
                blocked.add(id(node.parent))
        heapq.heapify(leaves)
        self._leaf_heap, self._num_reclaimable, self._memo_epoch = leaves, total, self.pool.cache_epoch

    def reset(self) -> int:
        """Drop every cached page (``/flush_cache``); pages a request still holds stay its own."""
        pages = [n.page for n in self._nodes()]
        if pages:
            self.pool.unref(pages, cache=True)
        self.root.children.clear()
        self.num_pages = 0
        self._record(AllBlocksCleared())
        return len(pages)

    # ------------------------------------------------------------------ events and checks
    def drain_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events

    def check_integrity(self) -> None:
        """Assert the tree and the pool agree: every node's page carries the cache's reference,
        once, and the pool counts exactly the tree's pages as cached."""
        pages = [n.page for n in self._nodes()]
        if len(set(pages)) != len(pages):
            raise AssertionError("a KV page sits at two places of the prefix cache")
        if len(pages) != self.num_pages or len(pages) != self.pool.num_cached:
            raise AssertionError(
                f"prefix cache holds {len(pages)} pages, counts {self.num_pages}, pool says {self.pool.num_cached}"
            )
        for page in pages:
            if not self.pool.is_cached(page) or self.pool.refcount(page) < 1:
                raise AssertionError(f"cached KV page {page} lacks the cache's reference")

    def _nodes(self) -> list[_Node]:
        out: list[_Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _record(self, event: CacheEvent) -> None:
        self.events.append(event)
        if len(self.events) > MAX_PENDING_EVENTS:
            del self.events[: len(self.events) - MAX_PENDING_EVENTS]
