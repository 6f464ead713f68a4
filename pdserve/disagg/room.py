"""One P/D room's lifecycle on one side, as a table: its states, the events that move it, and the
bound of every state (with the clock it is measured on and the failure it ends in).

A room is one request's half on a prefill or a decode rank. The managers fire an event whenever
something happens to a room (:meth:`RoomMachine.fire`; an event the table does not allow from the
current state raises :class:`IllegalTransition`, so a bug shows at once instead of a room being
stranded) and ask :meth:`RoomMachine.overdue` which room outlived its state's bound. Time comes from
an injectable clock, so the model-based tests drive thousands of interleavings in seconds.

A bound is measured from the room's arrival (:attr:`Since.ARRIVAL`: the whole wait for the other half
counts, whatever happened meanwhile), from entering the state (:attr:`Since.ENTRY`), or from the last
progress (:attr:`Since.PROGRESS`: a transfer may take as long as it keeps moving). Every state but
``done`` and ``failed`` has one, so every room ends in one of those two within a known time.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig

logger = logging.getLogger("pdserve.disagg.room")

PEER_GRACE_S = 2.0  # when the peer enforces the same bound and reports it better, wait this much longer


class Side(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class State(enum.Enum):
    # decode
    RESOLVING = "resolving"  # looking up the prefill rank and its RankInfo (pages may be reserved meanwhile)
    WAITING_FOR_PAGES = "waiting_for_pages"  # resolved; the prompt's pages are not reserved yet
    REQUESTED = "requested"  # KV request sent; prefill has not acknowledged it
    ACCEPTED = "accepted"  # acknowledged; no KV data yet (the prefill request may still be queued)
    STREAMING = "streaming"  # KV data arriving
    # prefill
    WAITING_FOR_DECODE = "waiting_for_decode"  # the prefill request is here, no KV request yet
    WAITING_FOR_PREFILL = "waiting_for_prefill_request"  # a KV request is here, no prefill request yet
    COMPUTING = "computing"  # paired; the prompt is queued or computing, no send in flight
    SENDING = "sending"  # paired; sends in flight (pages as chunks complete, then Aux and Status)
    # both
    DONE = "done"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.FAILED})


class Event(enum.Enum):
    # decode
    RESOLVED = "resolved"  # the prefill rank and its RankInfo are known
    PAGES = "pages"  # the prompt's pages are reserved
    REQUEST_SENT = "request_sent"  # both done: the KV request went out
    ACCEPTED = "accepted"  # prefill acknowledged the KV request
    DATA = "data"  # KV data arrived
    # prefill
    PAIRED = "paired"  # both halves are here
    SENDS_QUEUED = "sends_queued"  # pages (or Aux and Status) queued to the decode receiver
    SENDS_DRAINED = "sends_drained"  # every queued send completed, more chunks to compute
    # both
    COMPLETED = "completed"  # decode: Status ok; prefill: every send done
    FAILED = "failed"  # any named failure: refusal, abort, peer lost, a bound passed


class Since(enum.Enum):
    ARRIVAL = "arrival"
    ENTRY = "entry"
    PROGRESS = "progress"


class IllegalTransition(RuntimeError):
    """An event the table does not allow from the room's state."""


# (side, state, event) -> next state; FAILED is allowed from every live state (added below)
TRANSITIONS: dict[tuple[Side, State, Event], State] = {
    (Side.DECODE, State.RESOLVING, Event.PAGES): State.RESOLVING,
    (Side.DECODE, State.RESOLVING, Event.RESOLVED): State.WAITING_FOR_PAGES,
    (Side.DECODE, State.WAITING_FOR_PAGES, Event.PAGES): State.WAITING_FOR_PAGES,
    (Side.DECODE, State.WAITING_FOR_PAGES, Event.REQUEST_SENT): State.REQUESTED,
    (Side.DECODE, State.REQUESTED, Event.ACCEPTED): State.ACCEPTED,
    (Side.DECODE, State.REQUESTED, Event.DATA): State.STREAMING,  # pages may overtake a lost Accepted
    (Side.DECODE, State.ACCEPTED, Event.DATA): State.STREAMING,
    (Side.DECODE, State.STREAMING, Event.DATA): State.STREAMING,
    (Side.DECODE, State.ACCEPTED, Event.COMPLETED): State.DONE,  # a prompt whose pages decode had cached
    (Side.DECODE, State.STREAMING, Event.COMPLETED): State.DONE,
    (Side.PREFILL, State.WAITING_FOR_DECODE, Event.PAIRED): State.COMPUTING,
    (Side.PREFILL, State.WAITING_FOR_PREFILL, Event.PAIRED): State.COMPUTING,
    (Side.PREFILL, State.COMPUTING, Event.SENDS_QUEUED): State.SENDING,
    (Side.PREFILL, State.SENDING, Event.SENDS_QUEUED): State.SENDING,
    (Side.PREFILL, State.SENDING, Event.DATA): State.SENDING,
    (Side.PREFILL, State.SENDING, Event.SENDS_DRAINED): State.COMPUTING,  # the next chunk computes
    (Side.PREFILL, State.SENDING, Event.COMPLETED): State.DONE,
}
LIVE: dict[Side, frozenset[State]] = {
    side: frozenset(s for (sd, s, _), nxt in TRANSITIONS.items() if sd is side) for side in Side
}
for _side, _states in LIVE.items():
    for _state in _states:
        TRANSITIONS[(_side, _state, Event.FAILED)] = State.FAILED


@dataclass(frozen=True)
class Bound:
    """How long a room may stay in a state, measured from ``since``, and the failure it ends in."""

    seconds: float
    since: Since
    cause: str
    flag: str  # the flag that sets it, for the failure's message


def bounds(side: Side, config: DisaggConfig, peer_grace_s: float) -> dict[State, Bound]:
    """The bound of every live state of ``side`` under ``config``. ``peer_grace_s`` is added where the
    peer enforces the same bound and reports it better (so its reason normally arrives first)."""
    c = config
    if side is Side.DECODE:
        return {
            State.RESOLVING: Bound(c.bootstrap_timeout + peer_grace_s, Since.ARRIVAL, m.Cause.BOOTSTRAP_TIMEOUT,
                                   "--disaggregation-bootstrap-timeout"),
            State.WAITING_FOR_PAGES: Bound(c.waiting_timeout, Since.ARRIVAL, m.Cause.NO_PAGES,
                                           "--disaggregation-waiting-timeout"),
            State.REQUESTED: Bound(c.bootstrap_timeout, Since.ENTRY, m.Cause.HANDSHAKE_TIMEOUT,
                                   "--disaggregation-bootstrap-timeout"),
            State.ACCEPTED: Bound(c.waiting_timeout + peer_grace_s, Since.ARRIVAL, m.Cause.WAITING_TIMEOUT,
                                  "--disaggregation-waiting-timeout"),
            State.STREAMING: Bound(c.transfer_timeout, Since.PROGRESS, m.Cause.TRANSFER_TIMEOUT,
                                   "--disaggregation-transfer-timeout"),
        }
    return {
        State.WAITING_FOR_DECODE: Bound(c.waiting_timeout, Since.ARRIVAL, m.Cause.WAITING_TIMEOUT,
                                        "--disaggregation-waiting-timeout"),
        State.WAITING_FOR_PREFILL: Bound(c.waiting_timeout, Since.ARRIVAL, m.Cause.WAITING_TIMEOUT,
                                         "--disaggregation-waiting-timeout"),
        # a backstop: decode's ACCEPTED bound normally fails the room first and aborts it here
        State.COMPUTING: Bound(c.waiting_timeout + 2 * peer_grace_s, Since.ARRIVAL, m.Cause.WAITING_TIMEOUT,
                               "--disaggregation-waiting-timeout"),
        State.SENDING: Bound(c.transfer_timeout, Since.PROGRESS, m.Cause.TRANSFER_TIMEOUT,
                             "--disaggregation-transfer-timeout"),
    }


INITIAL = {Side.DECODE: (State.RESOLVING,), Side.PREFILL: (State.WAITING_FOR_DECODE, State.WAITING_FOR_PREFILL)}


@dataclass
class RoomMachine:
    """One room's state on one side; every change goes through :meth:`fire`."""

    side: Side
    bounds: dict[State, Bound]
    clock: Callable[[], float] = time.monotonic
    state: State | None = None
    arrived_at: float = 0.0
    entered_at: float = 0.0
    progress_at: float = 0.0
    failure: tuple[str, str] | None = None  # (cause, reason) once failed
    history: list[State] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = INITIAL[self.side][0]
        if self.state not in INITIAL[self.side]:
            raise IllegalTransition(f"a {self.side.value} room cannot start {self.state.value}")
        self.arrived_at = self.entered_at = self.progress_at = self.clock()
        self.history.append(self.state)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def fire(self, event: Event, cause: str = "", reason: str = "") -> State:
        """Apply ``event``; a failure must be named (``cause`` and ``reason``)."""
        assert self.state is not None
        nxt = TRANSITIONS.get((self.side, self.state, event))
        if nxt is None:
            raise IllegalTransition(f"{self.side.value} room: {event.value} is not allowed while {self.state.value}")
        if event is Event.FAILED:
            if not (cause and reason):
                raise IllegalTransition(f"{self.side.value} room failed while {self.state.value} without a named cause")
            self.failure = (cause, reason)
        now = self.clock()
        if nxt is not self.state or event is Event.DATA:  # queueing more sends is not progress
            self.progress_at = now
        if nxt is not self.state:
            self.state, self.entered_at = nxt, now
            self.history.append(nxt)
        return nxt

    def progress(self) -> None:
        """Something moved (a send completed) without changing the state: the progress bound restarts."""
        self.progress_at = self.clock()

    def deadline(self) -> float | None:
        """When the current state's bound passes (None once done)."""
        bound = self.bounds.get(self.state) if self.state is not None else None
        if bound is None:
            return None
        start = {Since.ARRIVAL: self.arrived_at, Since.ENTRY: self.entered_at, Since.PROGRESS: self.progress_at}
        return start[bound.since] + bound.seconds

    def fire_or(self, event: Event, fail: Callable[[str], None]) -> bool:
        """:meth:`fire` for the managers: an event the table does not allow calls ``fail(why)`` (which
        fails the room, named) instead of raising into the engine loop. Whether the room lives on."""
        try:
            self.fire(event)
            return True
        except IllegalTransition as e:
            logger.error("%s", e)
            fail(f"internal error: {e}")
            return False

    def overdue(self, now: float | None = None) -> Bound | None:
        """The current state's bound if it has passed, else None."""
        deadline = self.deadline()
        if deadline is None or (self.clock() if now is None else now) <= deadline:
            return None
        return self.bounds[self.state]
