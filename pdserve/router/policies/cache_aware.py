"""``cache_aware``: send a prompt to the unit holding most of its prefix, unless the units are out of balance.

Which unit holds what is the shared :class:`~pdserve.router.prefix_index.CacheIndex`: the page
hashes of the prompts sent to each unit, corrected by the servers' ``/kv_events`` feeds. Prompts
are matched by token-id page hashes when the ids are known (``input_ids``, or text the router
tokenized with the servers' tokenizer), else by character blocks.
Rules as in sglang-router: when ``max_load - min_load > abs_threshold`` and
``max_load > min_load * rel_threshold`` the least loaded unit wins; otherwise the unit with the
longest matched prefix wins if it covers more than ``threshold`` of the prompt, else the least loaded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.policies.cache_matching import CacheMatchingPolicy
from pdserve.router.prefix_index import CacheIndex, PromptMatcher
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class CacheAwarePolicy(CacheMatchingPolicy):
    name = "cache_aware"

    def __init__(
        self,
        index: CacheIndex | None = None,
        threshold: float = 0.3,
        abs_threshold: int = 4096,
        rel_threshold: float = 1.5,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(index, abs_threshold, rel_threshold, rng)
        self.threshold = threshold

    def imbalanced(self, units: Sequence[Unit]) -> bool:
        loads = [u.load for u in units]
        return self.out_of_balance(max(loads), min(loads))

    def best_match(self, units: Sequence[Unit], matcher: PromptMatcher) -> tuple[Unit | None, float]:
        """The unit with the longest matched prefix (ties: the less loaded) and the share of the
        prompt it matched; (None, 0) when no unit matches a page."""
        best, best_items = self.longest_match(units, matcher)
        if best is None or not best_items:
            return None, 0.0
        length = len(self.info_items(matcher, best))
        return best, best_items / length if length else 0.0

    @staticmethod
    def info_items(matcher: PromptMatcher, unit: Unit) -> Sequence[object]:
        """The prompt as ``unit`` is matched on: its token ids, or its text / ids key."""
        ids = matcher.info.token_ids_for(unit.worker.info.get("model_path"))
        return ids if ids is not None else matcher.info.key

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        matcher = PromptMatcher(self.index, info)
        unit = None
        if info.key and not self.imbalanced(units):
            best, share = self.best_match(units, matcher)
            if best is not None and share > self.threshold:
                unit = best
        if unit is None:
            unit = self.least_loaded(units)
        if info.key:
            matcher.record(unit)
        return unit
