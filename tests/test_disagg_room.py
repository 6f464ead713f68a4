"""The room state machine (disagg/room.py), model-based: random interleavings of both halves' events
under a fake clock — arrivals in either order, late or lost messages, aborts on either side,
refusals, peer deaths, slow and stalled pages, long queues — thousands of seeds in seconds. Every
room ends done or failed, never stays in a state longer than its bound, and every failure is named;
decode is done only when prefill is."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.room import (
    INITIAL,
    LIVE,
    PEER_GRACE_S,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    RoomMachine,
    Side,
    State,
    bounds,
)

CONFIG = DisaggConfig(bootstrap_timeout=3.0, waiting_timeout=10.0, transfer_timeout=2.0)
CAUSES = {v for k, v in vars(m.Cause).items() if k.isupper()}
TICK = 1e-9


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Stay:
    state: State
    entered: float
    left: float


@dataclass
class Tracked:
    """A machine and the stays it made (to check every stay against its bound)."""

    machine: RoomMachine
    stays: list[Stay] = field(default_factory=list)

    def fire(self, clock: Clock, event: Event, cause: str = "", reason: str = "") -> None:
        before, entered = self.machine.state, self.machine.entered_at
        self.machine.fire(event, cause, reason)
        if self.machine.state is not before:
            self.stays.append(Stay(before, entered, clock.now))


class World:
    """Both halves of one room, driven by a queue of timed events (the model of the two managers)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.clock = Clock()
        self.queue: list[tuple[float, int, str, tuple]] = []
        self.seq = itertools.count()
        self.decode: Tracked | None = None
        self.prefill: Tracked | None = None
        self.decode_bounds = bounds(Side.DECODE, CONFIG, PEER_GRACE_S)
        self.prefill_bounds = bounds(Side.PREFILL, CONFIG, PEER_GRACE_S)
        self.pages_ready = False
        self.resolved = False
        self.prefill_request_here = False
        self.kv_request_here = False
        self.tombstone: str | None = None  # prefill: a failure that answers a late half at once
        self.sends_left = 0

    # ------------------------------------------------------------------ scheduling
    def at(self, delay: float, what: str, *args) -> None:
        heapq.heappush(self.queue, (self.clock.now + delay, next(self.seq), what, args))

    def net(self) -> float:
        """A message's delay: usually short, sometimes long (a queue behind a backlog)."""
        return self.rng.choice([0.001, 0.01, 0.2, self.rng.uniform(0, 4)])

    def live(self, t: Tracked | None) -> bool:
        return t is not None and not t.machine.done

    # ------------------------------------------------------------------ both halves
    def fail(self, side: Side, cause: str, reason: str, tell_peer: bool = True) -> None:
        t = self.decode if side is Side.DECODE else self.prefill
        if self.live(t):
            t.fire(self.clock, Event.FAILED, cause, reason)
        if side is Side.PREFILL:
            self.tombstone = self.tombstone or reason
        if tell_peer:  # Status{error} / Abort / a refusal, or the loss seen by the other side
            self.at(self.net(), "peer_failed", Side.DECODE if side is Side.PREFILL else Side.PREFILL, cause)

    def handle(self, what: str, args: tuple) -> None:
        d, p = self.decode, self.prefill
        if what == "decode_arrives":
            self.decode = Tracked(RoomMachine(Side.DECODE, self.decode_bounds, self.clock))
        elif what == "resolved" and self.live(d) and d.machine.state is State.RESOLVING:
            self.resolved = True
            d.fire(self.clock, Event.RESOLVED)
            self.maybe_request()
        elif what == "pages" and self.live(d) and not self.pages_ready:
            self.pages_ready = True
            d.fire(self.clock, Event.PAGES)
            self.maybe_request()
        elif what == "prefill_arrives":
            self.prefill_request_here = True
            if self.tombstone is not None or (p is not None and p.machine.done):
                return  # a refused or failed room: answered by its tombstone
            if p is None:
                self.prefill = Tracked(RoomMachine(Side.PREFILL, self.prefill_bounds, self.clock,
                                                   State.WAITING_FOR_DECODE))
            else:
                self.pair()
        elif what == "kv_request_arrives":
            self.kv_request_here = True
            if self.tombstone is not None:
                self.at(self.net(), "peer_failed", Side.DECODE, m.Cause.PREFILL_REJECTED)
                return
            self.at(self.net(), "accepted")  # the control lane: not behind other rooms' pages
            if p is None:
                self.prefill = Tracked(RoomMachine(Side.PREFILL, self.prefill_bounds, self.clock,
                                                   State.WAITING_FOR_PREFILL))
            elif self.live(p):
                self.pair()
        elif what == "accepted" and self.live(d) and d.machine.state is State.REQUESTED:
            d.fire(self.clock, Event.ACCEPTED)
        elif what == "chunk_computed" and self.live(p):
            p.fire(self.clock, Event.SENDS_QUEUED)
            self.schedule_send()
        elif what == "send_done" and self.live(p):
            self.sends_left -= 1
            p.fire(self.clock, Event.DATA)
            self.at(self.net() / 10, "data")
            if not self.sends_left:
                p.fire(self.clock, Event.COMPLETED)
                self.at(self.net() / 10, "status_ok")  # behind the pages on the same connection
            elif self.rng.random() < 0.5:
                self.schedule_send()  # the next chunk was computed while this one was sent
            else:
                p.fire(self.clock, Event.SENDS_DRAINED)
                self.schedule_chunk()
        elif what == "data" and self.live(d) and d.machine.state in (State.REQUESTED, State.ACCEPTED,
                                                                    State.STREAMING):
            d.fire(self.clock, Event.DATA)
        elif what == "status_ok" and self.live(d) and d.machine.state in (State.ACCEPTED, State.STREAMING):
            d.fire(self.clock, Event.COMPLETED)
        elif what == "peer_failed":
            side, cause = args
            self.fail(side, cause, f"the other half failed: {cause}", tell_peer=False)
        elif what == "abort":
            side, = args
            cause = m.Cause.DECODE_ABORTED if side is Side.DECODE else m.Cause.PREFILL_ABORTED
            t = d if side is Side.DECODE else p
            if self.live(t) or (side is Side.PREFILL and p is None and self.prefill_request_here):
                self.fail(side, cause, f"{side.value} aborted")
        elif what == "peer_died":
            side, = args  # that side's process died: the other side sees its connection end
            t = d if side is Side.DECODE else p
            if self.live(t):
                t.fire(self.clock, Event.FAILED, m.Cause.PEER_LOST, "process died")
            other = Side.PREFILL if side is Side.DECODE else Side.DECODE
            self.at(self.rng.choice([0.001, 0.1]), "peer_failed", other, m.Cause.PEER_LOST)
        elif what == "refused" and p is None:  # the prefill front refused the prefill half (RejectRoom, 409)
            self.tombstone = "refused"
            self.at(self.net(), "peer_failed", Side.DECODE, m.Cause.PREFILL_REJECTED)

    def maybe_request(self) -> None:
        d = self.decode
        if self.resolved and self.pages_ready and d.machine.state is State.WAITING_FOR_PAGES:
            d.fire(self.clock, Event.REQUEST_SENT)
            if self.rng.random() > 0.03:  # else the KV request is lost (a prefill worker that is gone)
                self.at(self.net(), "kv_request_arrives")

    def pair(self) -> None:
        p = self.prefill
        if self.prefill_request_here and self.kv_request_here and p.machine.state in (
                State.WAITING_FOR_DECODE, State.WAITING_FOR_PREFILL):
            p.fire(self.clock, Event.PAIRED)
            self.sends_left = self.rng.randint(1, 6)
            self.schedule_chunk(queued=True)

    def schedule_chunk(self, queued: bool = False) -> None:
        """The next prefill chunk computes (the first one may wait behind a backlog of other requests)."""
        backlog = queued and self.rng.random() < 0.2
        self.at(self.rng.uniform(1.0, 8.0) if backlog else self.rng.uniform(0.001, 0.3), "chunk_computed")

    def schedule_send(self) -> None:
        stall = self.rng.random() < 0.03  # a send stuck past the transfer timeout
        self.at(CONFIG.transfer_timeout * 2 if stall else self.rng.uniform(0.001, 0.5), "send_done")

    # ------------------------------------------------------------------ run
    def check_bounds(self) -> None:
        """What the managers' timeout checks do: fail an overdue room, named, and tell the other half."""
        for side, t in ((Side.DECODE, self.decode), (Side.PREFILL, self.prefill)):
            if self.live(t):
                bound = t.machine.overdue()
                if bound is not None:
                    self.fail(side, bound.cause, f"{t.machine.state.value} past {bound.seconds:g} s ({bound.flag})")

    def next_deadline(self) -> float | None:
        deadlines = [t.machine.deadline() for t in (self.decode, self.prefill) if self.live(t)]
        deadlines = [x for x in deadlines if x is not None]
        return min(deadlines) if deadlines else None

    def run(self) -> None:
        rng = self.rng
        self.at(0.0, "decode_arrives")
        late = rng.choice([0.0, 0.05, 1.0, 6.0, CONFIG.waiting_timeout * 1.5])  # a backlog on the prefill rank
        if rng.random() < 0.93:
            self.at(late if rng.random() < 0.5 else 0.0, "prefill_arrives")
        if rng.random() < 0.95:
            self.at(rng.choice([0.001, 0.001, 0.5, 0.5, 0.5, CONFIG.bootstrap_timeout * 2]), "resolved")
        self.at(rng.choice([0.0, 0.01, 0.01, 2.0, 2.0, CONFIG.waiting_timeout * 2]), "pages")
        for what, p in (("abort", 0.08), ("peer_died", 0.05)):
            if rng.random() < p:
                self.at(rng.uniform(0, 12), what, rng.choice(list(Side)))
        if rng.random() < 0.04:
            self.at(rng.uniform(0, 3), "refused")
        while True:
            deadline = self.next_deadline()
            if self.queue and (deadline is None or self.queue[0][0] <= deadline):
                when, _, what, args = heapq.heappop(self.queue)
                self.clock.now = max(self.clock.now, when)
                self.handle(what, args)
            elif deadline is not None:
                self.clock.now = deadline + TICK
            else:
                break
            self.check_bounds()


def test_the_table_bounds_every_live_state_and_starts_where_rooms_start():
    for side, states in LIVE.items():
        table = bounds(side, CONFIG, PEER_GRACE_S)
        assert set(table) == set(states), side  # every live state has a bound, no other has
        assert set(INITIAL[side]) <= states
        for state in states:
            assert TRANSITIONS[(side, state, Event.FAILED)] is State.FAILED
    assert not any(k[1] in TERMINAL for k in TRANSITIONS)  # nothing leaves done or failed


def test_illegal_events_and_unnamed_failures_are_refused():
    clock = Clock()
    room = RoomMachine(Side.DECODE, bounds(Side.DECODE, CONFIG, PEER_GRACE_S), clock)
    with pytest.raises(IllegalTransition, match="completed is not allowed while resolving"):
        room.fire(Event.COMPLETED)
    with pytest.raises(IllegalTransition, match="without a named cause"):
        room.fire(Event.FAILED)
    room.fire(Event.FAILED, m.Cause.DECODE_ABORTED, "client gone")
    with pytest.raises(IllegalTransition):
        room.fire(Event.DATA)
    with pytest.raises(IllegalTransition):
        RoomMachine(Side.PREFILL, {}, clock, State.SENDING)
    failed: list[str] = []  # the managers' form: a disallowed event fails the room instead of raising
    other = RoomMachine(Side.PREFILL, bounds(Side.PREFILL, CONFIG, PEER_GRACE_S), clock, State.WAITING_FOR_DECODE)
    assert not other.fire_or(Event.COMPLETED, failed.append)
    assert failed and "completed is not allowed while waiting_for_decode" in failed[0]
    assert other.fire_or(Event.PAIRED, failed.append) and other.state is State.COMPUTING


def test_bounds_run_on_the_injected_clock():
    clock = Clock()
    room = RoomMachine(Side.DECODE, bounds(Side.DECODE, CONFIG, PEER_GRACE_S), clock)
    room.fire(Event.RESOLVED)
    room.fire(Event.REQUEST_SENT)
    clock.now = CONFIG.bootstrap_timeout  # measured from entering REQUESTED
    assert room.overdue() is None
    clock.now += 0.01
    assert room.overdue().cause == m.Cause.HANDSHAKE_TIMEOUT
    room.fire(Event.ACCEPTED)
    room.fire(Event.DATA)
    clock.now += CONFIG.transfer_timeout * 0.9
    room.progress()  # a transfer may last as long as it keeps moving
    clock.now += CONFIG.transfer_timeout * 0.9
    assert room.overdue() is None


@pytest.mark.parametrize("block", range(4))
def test_random_interleavings_end_done_or_failed_within_their_bounds(block):
    """1,000 seeds per block: both halves end done or failed, no stay outlives its state's bound,
    every failure is named with a known cause, and decode is done only when prefill is."""
    outcomes: dict[tuple, int] = {}
    for seed in range(block * 1000, (block + 1) * 1000):
        world = World(random.Random(seed))
        world.run()
        for t in (world.decode, world.prefill):
            if t is None:
                continue
            machine = t.machine
            assert machine.state in TERMINAL, (seed, machine.history)
            for stay in t.stays:
                bound = machine.bounds[stay.state]
                start = {"arrival": machine.arrived_at, "entry": stay.entered}.get(bound.since.value)
                if start is not None:  # progress bounds are checked by the machine at every event
                    assert stay.left - start <= bound.seconds + 2 * TICK, (seed, stay, bound)
            if machine.state is State.FAILED:
                cause, reason = machine.failure
                assert cause in CAUSES and reason, (seed, machine.failure)
        if world.decode.machine.state is State.DONE:
            assert world.prefill is not None and world.prefill.machine.state is State.DONE, seed
        key = (world.decode.machine.state, world.prefill.machine.state if world.prefill else None)
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes.get((State.DONE, State.DONE), 0) > 300, outcomes  # the model exercises success too
    assert sum(v for k, v in outcomes.items() if k[0] is State.FAILED) > 100, outcomes
