"""``sim`` KV transfer backend: the real stream protocol (Pages, Aux, Status frames over TCP), no
page bytes.

A job of ``bytes = pages * page_size * kv_bytes_per_token`` crosses two links, each a
:class:`SharedLink` whose bandwidth is divided fairly between the transfers active on it at each
moment (processor sharing, recomputed whenever a transfer starts or ends): the prefill rank's NIC
(all of its destinations share it) and the decode rank's NIC (all of its sources share it). After
the setup latency the sender sends the ``Pages`` frame (``nbytes = 0``) and waits out the bytes on
its link; the receiver, on that frame, waits out the same bytes on its own link before it writes
the pages. Both waits run at once and the stream is ordered, so the room's ``Status`` is handled
when both have ended: ``setup + max(bytes / prefill share, bytes / decode share)`` — a hot
prefill rank and a decode rank fed by many prefill ranks both show contention. (Each link shares
its bandwidth evenly without knowing that a flow is held back by the other link: no max-min
redistribution, so under two-sided contention the model is slightly pessimistic.)
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from dataclasses import dataclass

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    send_buffers,
)
from pdserve.engine.kv_pool import KVPool
from pdserve.sim.faults import FaultPlan


@dataclass
class LinkSpec:
    bandwidth: float  # bytes/s
    setup_s: float
    kv_bytes_per_token: int
    time_scale: float = 1.0
    faults: FaultPlan = FaultPlan()


class SharedLink:
    """A link whose bandwidth is split evenly between the transfers on it (fluid model)."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self._cond = threading.Condition()
        self._active: dict[int, float] = {}  # flow id -> bytes left
        self._updated = time.monotonic()
        self._next_id = 0

    def _advance(self) -> None:
        now = time.monotonic()
        if self._active:
            share = self.bandwidth / len(self._active) * (now - self._updated)
            for flow in self._active:
                self._active[flow] = max(0.0, self._active[flow] - share)
        self._updated = now

    def transfer(self, nbytes: float, time_scale: float = 1.0) -> None:
        """Block until ``nbytes`` have crossed the link (``time_scale`` slows the link uniformly)."""
        if nbytes <= 0:
            return
        with self._cond:
            self._advance()
            flow = self._next_id
            self._next_id += 1
            self._active[flow] = nbytes
            self._cond.notify_all()
            try:
                while True:
                    self._advance()
                    left = self._active[flow]
                    if left <= 1e-9:
                        return
                    rate = self.bandwidth / len(self._active) / time_scale
                    self._cond.wait(left / rate)
            finally:
                self._advance()
                del self._active[flow]
                self._cond.notify_all()


_LINKS: weakref.WeakKeyDictionary[KVPool, LinkSpec] = weakref.WeakKeyDictionary()


def register_link(pool: KVPool, spec: LinkSpec) -> None:
    """Attach the transfer model a sim engine's pool sends with (the backend only sees the pool)."""
    _LINKS[pool] = spec


class SimSender(StreamSender):
    backend = "sim"

    def __init__(self, pool: KVPool, *args, **kwargs) -> None:
        super().__init__(pool, *args, **kwargs)
        spec = _LINKS.get(pool)
        if spec is None:
            raise ValueError("the sim transfer backend needs a simulated engine (--simulate)")
        self.spec = spec
        self.link = SharedLink(spec.bandwidth)
        self.page_tokens = pool.page_size

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        spec = self.spec
        if spec.faults.hits("transfer", job.room):
            raise ConnectionError(f"injected fault: KV transfer of room {job.room} failed")
        nbytes = len(job.src_pages) * self.page_tokens * spec.kv_bytes_per_token
        scale = spec.time_scale * spec.faults.transfer_slowdown
        time.sleep(spec.setup_s * scale)
        send_buffers(dest.connect(), frame(m.Pages(job.room, job.dst_pages, 0)))  # the receiver's link starts now
        self.link.transfer(nbytes, scale)
        return nbytes


class SimReceiver(StreamReceiver):
    backend = "sim"
    close_stops_writes = True

    def __init__(self, pool: KVPool, *args, **kwargs) -> None:
        spec = _LINKS.get(pool)
        if spec is None:
            raise ValueError("the sim transfer backend needs a simulated engine (--simulate)")
        self.spec = spec
        self.link = SharedLink(spec.bandwidth)  # this decode rank's NIC, shared by every prefill rank sending to it
        super().__init__(pool, *args, **kwargs)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("sim", self.host, self.port, self.pool.num_pages)

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        if msg.nbytes != 0:
            raise ConnectionError(f"room {msg.room}: a sim frame carries no payload, {msg.nbytes} bytes announced")
        if any(not 0 <= p < self.pool.num_pages for p in msg.dst_pages):
            return f"destination page outside [0, {self.pool.num_pages})"
        spec = self.spec
        self.link.transfer(len(msg.dst_pages) * self.pool.page_size * spec.kv_bytes_per_token,
                           spec.time_scale * spec.faults.transfer_slowdown)
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is not None:
            self.end_write(slot)
        return error
