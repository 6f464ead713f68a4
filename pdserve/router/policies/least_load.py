"""``least_load``: the unit with the fewest tokens in flight (the router's count, corrected by /get_load)."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.policies.base import Policy
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class LeastLoadPolicy(Policy):
    name = "least_load"
    uses_load = True

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        return self.least_loaded(units)
