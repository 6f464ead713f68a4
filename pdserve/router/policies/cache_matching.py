"""What the cache-matching policies (``cache_aware``, ``prefix``) share: the prefix index, the
longest-match search over units, and sglang-router's load guard.

The guard: a load gap counts as out of balance when it exceeds ``abs_threshold`` tokens *and* the
higher load exceeds the lower by more than ``rel_threshold`` times; each policy applies it to the
pair of loads it cares about.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.policies.base import Policy
from pdserve.router.prefix_index import CacheIndex, PromptMatcher
from pdserve.router.worker import Unit


class CacheMatchingPolicy(Policy):
    """Base of the policies that route by where a prompt's prefix is cached."""

    uses_load = True
    uses_cache = True

    def __init__(
        self,
        index: CacheIndex | None = None,
        abs_threshold: int = 4096,
        rel_threshold: float = 1.5,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(rng)
        self.index = index if index is not None else CacheIndex()
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold

    def out_of_balance(self, high: int | float, low: int | float) -> bool:
        """sglang-router's guard: ``high`` exceeds ``low`` by both thresholds."""
        return high - low > self.abs_threshold and high > low * self.rel_threshold

    @staticmethod
    def longest_match(units: Sequence[Unit], matcher: PromptMatcher) -> tuple[Unit | None, int]:
        """The unit holding the most of the prompt's leading pages (ties: the less loaded), and how many."""
        best, best_items = None, 0
        for u in units:
            items = matcher.matched_items(u)
            if items > best_items or (items == best_items and best is not None and u.load < best.load):
                best, best_items = u, items
        return best, best_items

    def forget(self, unit: Unit) -> None:
        self.index.forget(unit)
