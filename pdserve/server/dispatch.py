"""Load-balance policies: which DP rank gets a request that does not pin one.

Policies see the front's own, always-current accounting of each rank (requests and tokens it
has sent there and not yet seen finish) rather than the worker-reported load, which lags by up
to one engine step. Dead ranks are skipped, except by ``follow_bootstrap_room`` whose choice
must match the peer server's computation (the caller then fails the request).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class RankView:
    """What a policy may look at for one rank."""

    rank: int
    alive: bool
    num_reqs: int  # in flight at this rank
    num_tokens: int  # prompt + generated tokens of those requests


class NoRankAvailable(RuntimeError):
    """Every DP rank is dead."""


class DispatchPolicy(ABC):
    """Picks a rank; called from the front's event loop only."""

    def __init__(self, dp_size: int) -> None:
        self.dp_size = dp_size
        self._next = 0

    @abstractmethod
    def select(self, ranks: Sequence[RankView], bootstrap_room: int | None = None) -> int: ...

    def _rotation(self, ranks: Sequence[RankView]) -> list[RankView]:
        """Alive ranks starting after the last pick, so ties spread round-robin."""
        n = len(ranks)
        order = [ranks[(self._next + i) % n] for i in range(n)]
        alive = [r for r in order if r.alive]
        if not alive:
            raise NoRankAvailable("no DP rank is alive")
        return alive

    def _picked(self, rank: int) -> int:
        self._next = (rank + 1) % self.dp_size
        return rank


class RoundRobin(DispatchPolicy):
    def select(self, ranks: Sequence[RankView], bootstrap_room: int | None = None) -> int:
        return self._picked(self._rotation(ranks)[0].rank)


class ShortestQueue(DispatchPolicy):
    def select(self, ranks: Sequence[RankView], bootstrap_room: int | None = None) -> int:
        return self._picked(min(self._rotation(ranks), key=lambda r: r.num_reqs).rank)


class MinimumTokens(DispatchPolicy):
    def select(self, ranks: Sequence[RankView], bootstrap_room: int | None = None) -> int:
        return self._picked(min(self._rotation(ranks), key=lambda r: (r.num_tokens, r.num_reqs)).rank)


class FollowBootstrapRoom(DispatchPolicy):
    """``bootstrap_room % dp_size``, as SGLang's prefill and decode both compute; round robin without a room."""

    def __init__(self, dp_size: int) -> None:
        super().__init__(dp_size)
        self._fallback = RoundRobin(dp_size)

    def select(self, ranks: Sequence[RankView], bootstrap_room: int | None = None) -> int:
        if bootstrap_room is None:
            return self._fallback.select(ranks)
        return bootstrap_room % self.dp_size


POLICIES: dict[str, type[DispatchPolicy]] = {
    "round_robin": RoundRobin,
    "shortest_queue": ShortestQueue,
    "minimum_tokens": MinimumTokens,
    "follow_bootstrap_room": FollowBootstrapRoom,
}


def make_policy(name: str, dp_size: int) -> DispatchPolicy:
    try:
        return POLICIES[name](dp_size)
    except KeyError:
        raise ValueError(f"unknown load balance method {name!r}; known: {', '.join(POLICIES)}") from None
