"""The bound on the wait after a first token, as a strategy the scheduler consults.

A request retracted after its first token is *stalled* until it decodes again. Retraction under KV
pressure picks the running request that has waited least so far, the newest among equals. One that
has waited ``priority_s`` gets priority: admitted without the others' decode reserve, and when its
own pages or a running slot are missing, running requests that waited less are retracted for it
(newest first, each at most :data:`MAX_PRIORITY_PREEMPTIONS` times). One that still cannot run
within ``timeout_s`` of its retraction fails alone. The policy decides who and when; the scheduler
decides what fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.request import Req

MAX_PRIORITY_PREEMPTIONS = 2  # times one request may be retracted for a request that waited longer


class StallPolicy:
    """Who waits, who is retracted first, and when a stalled request gets priority or fails."""

    def __init__(self, priority_s: float, timeout_s: float) -> None:
        self.priority_s = priority_s
        self.timeout_s = timeout_s

    @staticmethod
    def waited(req: Req, now: float) -> float:
        """Seconds ``req`` has spent retracted after its first token, the current wait included."""
        return req.stalled_s + (now - req.stalled_since if req.stalled_since is not None else 0.0)

    def retraction_order(self, now: float) -> Callable[[Req], tuple[float, int]]:
        """Sort key: retract first whoever has waited least after its first token, the newest among equals."""
        return lambda req: (self.waited(req, now), -req.arrival_order)

    def has_priority(self, req: Req, now: float) -> bool:
        return req.stalled_since is not None and now - req.stalled_since >= self.priority_s

    def expired(self, waiting: Iterable[Req], now: float) -> list[Req]:
        """Stalled requests past the hard bound: they fail."""
        return [r for r in waiting if r.stalled_since is not None and now - r.stalled_since >= self.timeout_s]

    def deadline_passed(self, waiting: Iterable[Req], now: float) -> bool:
        """A stalled request reached its priority (not yet applied) or its hard bound."""
        for req in waiting:
            if req.stalled_since is not None:
                waited = now - req.stalled_since
                if waited >= self.timeout_s or (waited >= self.priority_s and not req.priority_tried):
                    return True
        return False

    def most_urgent(self, waiting: Iterable[Req], now: float) -> Req | None:
        """The stalled request with priority that has waited longest; every one with priority is
        marked as considered (only a change of state or the hard bound wakes a blocked rank again)."""
        urgent = [r for r in waiting if self.has_priority(r, now)]
        for r in urgent:
            r.priority_tried = True
        return max(urgent, key=lambda r: self.waited(r, now)) if urgent else None

    def victims(self, req: Req, running: Iterable[Req], now: float) -> list[Req]:
        """Running requests that may be retracted for ``req``, in retraction order."""
        waited = self.waited(req, now)
        return sorted((r for r in running if r.num_preempted < MAX_PRIORITY_PREEMPTIONS
                       and self.waited(r, now) < waited), key=self.retraction_order(now))
