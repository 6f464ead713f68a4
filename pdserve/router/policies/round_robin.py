"""``round_robin``: the units in turn."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.policies.base import Policy
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self.counter = 0

    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        unit = units[self.counter % len(units)]
        self.counter += 1
        return unit
