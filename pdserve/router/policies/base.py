"""The one interface every selection policy implements."""

from __future__ import annotations

import random as _random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit


class Policy(ABC):
    """Picks one unit (server, DP rank) of one side for a request."""

    name: ClassVar[str]
    uses_load: ClassVar[bool] = False  # whether the router must poll /get_load for it
    uses_cache: ClassVar[bool] = False  # whether it reads the cache index (tokenized prompts, /kv_events)

    def __init__(self, rng: _random.Random | None = None) -> None:
        self.rng = rng or _random.Random()

    @abstractmethod
    def select(self, units: Sequence[Unit], info: RequestInfo) -> Unit:
        """One of ``units`` (never empty) for the request ``info`` describes."""

    def forget(self, unit: Unit) -> None:
        """``unit`` left the fleet: drop any state kept for it."""
        return None

    def least_loaded(self, units: Sequence[Unit]) -> Unit:
        """The unit with the lowest load; ties broken at random so idle units share the work."""
        best = min(u.load for u in units)
        ties = [u for u in units if u.load == best]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)
