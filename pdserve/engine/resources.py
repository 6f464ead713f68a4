"""The scheduler's resources: running slots and one admission decision per round.

mini-sglang's vocabulary: a request runs only while it holds a slot of a table sized by
``--max-running-requests`` (:class:`SlotTable`), and one :class:`Admission` per scheduling round
decides, for every path that makes a request runnable (a colocated prefill, a P/D decode page
pre-allocation, a parallel-sample fork), whether it gets a slot and its pages: the round's prefill
token budget, and the decode reserve every running request keeps so admitting more does not force
retractions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pdserve.engine.kv_pool import KVPool

if TYPE_CHECKING:
    from pdserve.engine.request import Req


class IntegrityError(AssertionError):
    """The scheduler's books disagree with themselves (a slot, page or id accounted wrongly)."""


class SlotTable:
    """``size`` running slots; a request holds one (``req.attempt.slot``) from admission until it
    finishes, is retracted or aborted, so at most ``size`` requests ever run at once."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the running cap must be >= 1, got {size}")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out slot 0 first
        self._holder: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return len(self._holder)

    def acquire(self, req: Req) -> bool:
        """Give ``req`` a slot; False when none is free. A request holding one keeps it."""
        if req.attempt.slot is not None:
            return True
        if not self._free:
            return False
        slot = self._free.pop()
        self._holder[slot] = req.rid
        req.attempt.slot = slot
        return True

    def release(self, req: Req) -> None:
        slot = req.attempt.slot
        if slot is None:
            return
        if self._holder.pop(slot, None) != req.rid:
            raise IntegrityError(f"request {req.rid} released slot {slot}, which it did not hold")
        self._free.append(slot)
        req.attempt.slot = None

    def check(self, holders: Iterable[Req]) -> None:
        """Exactly ``holders`` hold slots, one each, and every other slot is free once."""
        held = {}
        for req in holders:
            slot = req.attempt.slot
            if slot is None:
                raise IntegrityError(f"request {req.rid} ({req.state.value}) runs without a slot")
            if slot in held:
                raise IntegrityError(f"slot {slot} is held by both {held[slot]} and {req.rid}")
            held[slot] = req.rid
        if held != self._holder:
            raise IntegrityError(f"slot holders {held} differ from the table's {self._holder}")
        free = set(self._free)
        if len(free) != len(self._free) or free & set(held) or len(free) + len(held) != self.size:
            raise IntegrityError(f"free slots {sorted(self._free)} and held slots {sorted(held)} do not "
                                 f"partition the {self.size} slots")


class Admission:
    """One round's admission decision: free slots, pages, the prefill token budget and the decode
    reserve (pages kept free for the next tokens of every request that already runs or whose KV is
    arriving). Each admitted request adds its own reserve for the rest of the round."""

    def __init__(self, pool: KVPool, slots: SlotTable, reserve: int, busy: bool, budget: int = 0) -> None:
        self.pool = pool
        self.slots = slots
        self.reserve = reserve
        self.busy = busy  # something runs: the reserve applies (with nothing running a prompt that fits is admitted)
        self.budget = budget  # prefill tokens this round may still compute

    def fits(self, need: int, own_reserve: int, urgent: bool = False) -> bool:
        """Whether a request needing ``need`` new pages (and ``own_reserve`` pages of decode reserve
        once running) may run now. ``urgent``: it waited past the stall priority and skips the
        others' reserve, not the slot or its own pages."""
        if not self.slots.num_free or not self.pool.can_alloc(need):
            return False
        return not self.busy or urgent or self.pool.can_alloc(need + self.reserve + own_reserve)

    def admit(self, req: Req, need: int, own_reserve: int) -> list[int]:
        """Take a slot and ``need`` pages for ``req`` (after :meth:`fits` said yes)."""
        if not self.slots.acquire(req):
            raise IntegrityError(f"admitted {req.rid} without a free slot")
        self.reserve += own_reserve
        self.busy = True
        return self.pool.alloc(need)
