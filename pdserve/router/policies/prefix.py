"""``prefix`` (decode side): keep a conversation on the decode rank that holds its previous turns.

A conversation is recognised by its prompt, not by an id: turn ``n``'s prompt begins with turn
``n - 1``'s prompt and answer, so the unit whose cache holds the longest leading run of this
prompt's pages (:class:`~pdserve.router.prefix_index.CacheIndex`: the pages of prompts sent there,
corrected by the servers' ``/kv_events``) gets the request, and P/D decode then asks prefill only
for the pages it lacks. Any match of one full page or more wins, unlike ``cache_aware``'s share
threshold: on decode, every reused page is a page not transferred.
Load guard (per unit, with sglang-router's thresholds): the matched unit is passed over for the
least loaded one when its load exceeds the least load by more than ``abs_threshold`` tokens and by
more than ``rel_threshold`` times; so a popular conversation cannot pile onto one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.policies.cache_matching import CacheMatchingPolicy
from pdserve.router.prefix_index import PromptMatcher
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class PrefixPolicy(CacheMatchingPolicy):
    name = "prefix"

    def overloaded(self, unit: Unit, least: Unit) -> bool:
        return self.out_of_balance(unit.load, least.load)

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        matcher = PromptMatcher(self.index, info)
        least = self.least_loaded(units)
        unit = least
        if info.key:
            best, best_items = self.longest_match(units, matcher)
            if best is not None and best_items and not self.overloaded(best, least):
                unit = best
            matcher.record(unit)
        return unit
