"""``random``: a uniformly random unit."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.policies.base import Policy
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class RandomPolicy(Policy):
    name = "random"

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        return self.rng.choice(units)
