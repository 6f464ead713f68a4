"""``cache_aware``: send a prompt where its prefix went before, unless the units are out of balance.

Each unit keeps an approximate prefix tree: the chained hashes of the prompt's leading blocks
(``block`` characters of text, or ``block / 4`` token ids), least recently used evicted first.
Rules as in sglang-router: when ``max_load - min_load > abs_threshold`` and
``max_load > min_load * rel_threshold`` the least loaded unit wins; otherwise the unit with the
longest matched prefix wins if it covers more than ``threshold`` of the prompt, else the least loaded.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

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

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        hashes, block = prefix_hashes(info.key, self.block_chars)
        unit = None
        if hashes and not self.imbalanced(units):
            best, best_match = None, 0
            for u in units:
                tree = self.trees.get(u)
                m = tree.match(hashes) if tree is not None else 0
                if m > best_match or (m == best_match and best is not None and u.load < best.load):
                    best, best_match = u, m
            if best is not None and best_match * block / len(info.key) > self.threshold:
                unit = best
        if unit is None:
            unit = self.least_loaded(units)
        if hashes:
            tree = self.trees.get(unit)
            if tree is None:
                tree = self.trees[unit] = PrefixBlocks(self.max_blocks)
            tree.insert(hashes)
        return unit

    def forget(self, unit: Unit) -> None:
        self.trees.pop(unit, None)
