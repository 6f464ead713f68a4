"""Choosing the units of one request: a (prefill, decode) pair, or one mixed unit.

Decoupled (default): each side's policy picks among that side's healthy units on its own, so any
prefill rank can feed any decode rank. ``dp_coupled`` reproduces the old behaviour for comparison:
the decode policy picks a unit of rank ``r``, then the prefill policy picks among prefill units of
rank ``r % dp_size`` (equal ranks when the DP sizes match).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from pdserve.router.fleet import Fleet
from pdserve.router.policies import Policy
from pdserve.router.request_info import RequestInfo
from pdserve.router.worker import Unit, Worker


class NoWorkers(Exception):
    """No healthy unit on one side."""

    def __init__(self, side: str) -> None:
        super().__init__("no healthy worker" if side == "mixed" else f"no healthy {side} worker")
        self.side = side


class BadClientRank(Exception):
    """A rank a client pinned that no healthy unit of that side has; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def client_rank(body: dict, *fields: str) -> tuple[str, int | None]:
    """The first of ``fields`` the body sets, and its rank (BadClientRank unless a non-negative int)."""
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadClientRank(field, f"{field} must be a non-negative integer, got {value!r}")
        return field, value
    return fields[0], None


def _pinned(units: list[Unit], rank: int | None, field: str) -> list[Unit]:
    if rank is None:
        return units
    kept = [u for u in units if u.rank == rank]
    if not kept:
        sizes = sorted({u.worker.dp_size for u in units})
        raise BadClientRank(field, f"{field}={rank}: no healthy unit has that DP rank (DP sizes here: {sizes})")
    return kept


@dataclass(frozen=True)
class ClientPins:
    """The DP ranks a client named, and the field (or header) each came from, for error messages."""

    prefill: int | None = None
    decode: int | None = None
    prefill_field: str = "disagg_prefill_dp_rank"
    decode_field: str = "data_parallel_rank"


NO_PINS = ClientPins()


class Pairing:
    def __init__(self, fleet: Fleet, prefill_policy: Policy, decode_policy: Policy, dp_coupled: bool = False) -> None:
        self.fleet = fleet
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.dp_coupled = dp_coupled

    def candidates(self, role: str, exclude: Set[Worker | Unit]) -> list[Unit]:
        """Healthy units of ``role`` outside ``exclude`` (workers or single units; all healthy ones if
        that leaves none)."""
        units = self.fleet.units(role)
        if not units:
            raise NoWorkers(role)
        if exclude:
            kept = [u for u in units if u.worker not in exclude and u not in exclude]
            if kept:
                return kept
        return units

    def pick_pair(self, info: RequestInfo, exclude: Set[Worker | Unit] = frozenset(),
                  pins: ClientPins = NO_PINS) -> tuple[Unit, Unit]:
        """A (prefill, decode) pair; ``pins`` restrict each side to units of the DP rank the client
        named (``--honor-client-ranks``)."""
        prefills = _pinned(self.candidates("prefill", exclude), pins.prefill, pins.prefill_field)
        decodes = _pinned(self.candidates("decode", exclude), pins.decode, pins.decode_field)
        if not self.dp_coupled:
            return self.prefill_policy.select(prefills, info), self.decode_policy.select(decodes, info)
        decode = self.decode_policy.select(decodes, info)
        matching = [u for u in prefills if u.rank == decode.rank % u.worker.dp_size]
        return self.prefill_policy.select(matching, info), decode

    def pick_one(self, info: RequestInfo, exclude: Set[Worker | Unit] = frozenset(), pins: ClientPins = NO_PINS) -> Unit:
        """A mixed unit; the decode pin restricts the choice to units of that DP rank (``--honor-client-ranks``)."""
        units = _pinned(self.candidates("mixed", exclude), pins.decode, pins.decode_field)
        return self.prefill_policy.select(units, info)
