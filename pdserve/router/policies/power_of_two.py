"""``power_of_two``: two units at random, the less loaded of them."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.policies.base import Policy
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"
    uses_load = True

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        if len(units) == 1:
            return units[0]
        a, b = self.rng.sample(range(len(units)), 2)
        return units[a] if units[a].load <= units[b].load else units[b]
