"""``cache_aware``: send a prompt where its prefix went before, unless the units are out of balance.

Each unit keeps an approximate prefix tree: the chained hashes of the prompt's leading blocks,
least recently used evicted first. A prompt given as token ids is hashed per KV page of the unit's
server (``page_size`` from its ``/server_info``) with the engine's own page hashes
(:func:`pdserve.kv_events.page_hashes`, the hashes of the servers' ``/kv_events``), so a
match means whole cached pages; text is hashed per ``block`` characters.
Rules as in sglang-router: when ``max_load - min_load > abs_threshold`` and
``max_load > min_load * rel_threshold`` the least loaded unit wins; otherwise the unit with the
longest matched prefix wins if it covers more than ``threshold`` of the prompt, else the least loaded.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from pdserve.kv_events import page_hashes
from pdserve.router.policies.base import Policy
from pdserve.router.request_info import CHARS_PER_TOKEN, RequestInfo
from pdserve.router.worker import Unit


class PrefixBlocks:
    """The prefix-block hashes one unit has seen, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` this unit has seen."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        blocks = self.blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self.blocks)


def prefix_hashes(key: str | tuple[int, ...], block_chars: int) -> tuple[list[int], int]:
    """Chained hashes of the full leading blocks of ``key``, and the block length used."""
    block = block_chars if isinstance(key, str) else max(1, block_chars // CHARS_PER_TOKEN)
    hashes = []
    h = 0
    for start in range(0, len(key) - block + 1, block):
        h = hash((h, key[start:start + block]))
        hashes.append(h)
    return hashes, block


class CacheAwarePolicy(Policy):
    name = "cache_aware"
    uses_load = True

    def __init__(
        self,
        threshold: float = 0.3,
        abs_threshold: int = 256,
        rel_threshold: float = 1.5,
        max_blocks: int = 1 << 20,
        block_chars: int = 16,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(rng)
        self.threshold = threshold
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.max_blocks = max_blocks
        self.block_chars = block_chars
        self.trees: dict[Unit, PrefixBlocks] = {}

    def imbalanced(self, units: Sequence[Unit]) -> bool:
        loads = [u.load for u in units]
        lo, hi = min(loads), max(loads)
        return hi - lo > self.abs_threshold and hi > lo * self.rel_threshold

    def hashes_for(self, unit: Unit, key: str | tuple[int, ...]) -> tuple[list[int], int]:
        """The prefix hashes of ``key`` as ``unit`` caches them, and the block length in key items."""
        page_size = unit.worker.info.get("page_size")
        if isinstance(key, tuple) and isinstance(page_size, int) and page_size > 0:
            return page_hashes(key, page_size), page_size
        return prefix_hashes(key, self.block_chars)

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        per_block: dict[object, tuple[list[int], int]] = {}

        def hashes_of(u: Unit) -> tuple[list[int], int]:
            size = u.worker.info.get("page_size")
            size = size if isinstance(size, int) and not isinstance(size, bool) else None
            if size not in per_block:
                per_block[size] = self.hashes_for(u, info.key)
            return per_block[size]

        unit = None
        if info.key and not self.imbalanced(units):
            best, best_match, best_block = None, 0, 1
            for u in units:
                tree = self.trees.get(u)
                hashes, block = hashes_of(u)
                m = tree.match(hashes) if tree is not None and hashes else 0
                if m > best_match or (m == best_match and best is not None and u.load < best.load):
                    best, best_match, best_block = u, m, block
            if best is not None and best_match * best_block / len(info.key) > self.threshold:
                unit = best
        if unit is None:
            unit = self.least_loaded(units)
        hashes, _ = hashes_of(unit) if info.key else ([], 1)
        if hashes:
            tree = self.trees.get(unit)
            if tree is None:
                tree = self.trees[unit] = PrefixBlocks(self.max_blocks)
            tree.insert(hashes)
        return unit

    def forget(self, unit: Unit) -> None:
        self.trees.pop(unit, None)
