"""The transfer interface: a :class:`KVSender` on each prefill rank, a :class:`KVReceiver` on each
decode rank.

The model is that of RDMA-style engines (NIXL, Mooncake): the receiver publishes where its pages
live (:class:`ReceiverInfo`), the sender writes page lists straight into that memory and follows
each write with a small ordered notification (:class:`Pages`, then :class:`Aux` and
:class:`Status`). Whatever a backend does, its receiver reports these stream messages, in order,
through ``on_event`` — plus :class:`PeerLost` when a sender's connection dies mid-room.

Every connection is authenticated before any frame is read (:class:`ReceiverGuard`: the
deployment's secret, a cap on concurrent connections, a handshake deadline and an idle bound).

Sends are queued and executed on backend threads; every queued job is reported once through
``on_done`` (success, error or cancellation), so the caller knows when it may free the source pages.
A sender also watches the receivers it is connected to, idle or not, and reports one that is gone
through ``on_lost`` (:class:`ReceiverLost`), so rooms bound to a dead decode fail before a send does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.messages import ReceiverInfo, StreamMsg
from pdserve.disagg.stats import Refusals
from pdserve.engine.kv_pool import KVPool


@dataclass
class SendResult:
    """Outcome of one queued send job."""

    room: int
    kind: str  # "pages" | "message"
    nbytes: int = 0
    seconds: float = 0.0
    done_at: float = 0.0  # time.monotonic() when the job finished
    error: str | None = None
    cancelled: bool = False
    tag: Any = None  # whatever the caller passed with the job


@dataclass
class PeerLost:
    """The stream from one prefill sender ended while these rooms were still open."""

    rooms: list[int]
    peer: str
    reason: str


ReceiverEvent = StreamMsg | PeerLost


@dataclass
class ReceiverLost:
    """A sender's connection to this receiver ended or stopped answering (the decode process died,
    restarted, or its host went silent)."""

    address: str
    reason: str


@dataclass
class ReceiverGuard:
    """What a receiver's listener enforces before and while serving a connection."""

    auth: PlaneAuth = field(default_factory=lambda: PlaneAuth(None))
    refusals: Refusals = field(default_factory=Refusals)
    max_connections: int = 256  # concurrent connections; more are closed at once
    handshake_timeout: float = 5.0  # a connection must authenticate within this
    idle_timeout: float = 60.0  # an authenticated connection with no frame and no open room of its own is closed


class KVSender(ABC):
    """Prefill side: writes pages of the local pool into remote decode pools, in order per receiver."""

    backend: ClassVar[str]

    def __init__(
        self, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float, auth: PlaneAuth | None = None,
        idle_timeout: float = 60.0,
    ) -> None:
        self.pool = pool
        self.on_done = on_done
        self.io_timeout = io_timeout
        self.auth = auth or PlaneAuth(None)
        self.idle_timeout = idle_timeout  # the receivers' bound: connections idle half as long are not reused
        self.on_lost: Callable[[ReceiverLost], None] | None = None  # set by the caller

    @abstractmethod
    def send_pages(
        self, dst: ReceiverInfo, room: int, src_pages: list[int], dst_pages: list[int], tag: Any = None
    ) -> None:
        """Queue: copy local ``src_pages`` (all layers) into ``dst_pages`` of ``dst``, then notify it."""

    @abstractmethod
    def send_message(self, dst: ReceiverInfo, msg: StreamMsg, tag: Any = None) -> None:
        """Queue a small message behind every job already queued for ``dst``."""

    @abstractmethod
    def cancel(self, room: int) -> None:
        """Skip the room's jobs queued so far (reported with ``cancelled=True``); jobs queued later run."""

    @abstractmethod
    def close(self) -> None:
        """Stop the threads and drop connections; queued jobs are reported as cancelled."""


class KVReceiver(ABC):
    """Decode side: exposes where pages go and reports what senders wrote."""

    backend: ClassVar[str]
    close_stops_writes: ClassVar[bool]  # True: after close_room no sender can touch the room's pages

    def __init__(
        self,
        pool: KVPool,
        on_event: Callable[[ReceiverEvent], None],
        host: str,
        io_timeout: float,
        guard: ReceiverGuard | None = None,
    ) -> None:
        self.pool = pool
        self.on_event = on_event
        self.host = host
        self.io_timeout = io_timeout
        self.guard = guard or ReceiverGuard()

    @abstractmethod
    def info(self) -> ReceiverInfo:
        """The endpoint description a KV request carries to the prefill rank."""

    @abstractmethod
    def open_room(self, room: int, pages: list[int]) -> None:
        """Accept writes for ``room`` into ``pages`` (and nowhere else)."""

    @abstractmethod
    def close_room(self, room: int) -> bool:
        """Accept no more writes for ``room``; True when none can happen any more (:attr:`close_stops_writes`)."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening and close every connection."""
