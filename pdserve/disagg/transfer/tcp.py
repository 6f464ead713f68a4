"""``tcp`` backend: page bytes travel on the stream, straight between the two pools.

The sender gathers the source pages' memory into ``sendmsg`` calls; the receiver scatters the
payload with ``recvmsg_into`` directly into the destination pages of its pool — no intermediate
buffer on either side. A pool that is not host memory (a GPU pool) is staged through a bounded host
buffer instead (:mod:`.staging`), with the same bytes on the wire. Works across hosts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from pdserve.disagg import messages as m
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.transfer.base import ReceiverEvent, ReceiverGuard, SendResult
from pdserve.disagg.transfer.staging import DEFAULT_STAGING_BYTES, PageStaging, needs_staging
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    page_arrays,
    page_buffers,
    recv_buffers,
    send_buffers,
)
from pdserve.engine.kv_pool import KVPool

DISCARD_CHUNK = 1 << 20


class TcpSender(StreamSender):
    """``staging``: move pages through host buffers of ``staging_bytes`` (None: when the pool is not
    host memory; see :func:`.staging.needs_staging`)."""

    backend = "tcp"

    def __init__(self, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
                 auth: PlaneAuth | None = None, idle_timeout: float = 60.0, staging: bool | None = None,
                 staging_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        self.staging = PageStaging(pool, staging_bytes) if needs_staging(pool, staging) else None
        self.src_arrays = page_arrays(pool.layers) if self.staging is None else []
        super().__init__(pool, on_done, io_timeout, auth, idle_timeout)

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        nbytes = len(job.src_pages) * len(self.pool.layers) * self.pool.page_bytes()
        header = frame(m.Pages(job.room, job.dst_pages, nbytes))
        if self.staging is not None:
            self.staging.send(dest.connect(), job.src_pages, header)
        else:
            send_buffers(dest.connect(), header + page_buffers(self.src_arrays, job.src_pages))
        return nbytes


class TcpReceiver(StreamReceiver):
    backend = "tcp"
    close_stops_writes = True  # only this process writes into the pool

    def __init__(self, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
                 guard: ReceiverGuard | None = None, staging: bool | None = None,
                 staging_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        self.staging = PageStaging(pool, staging_bytes) if needs_staging(pool, staging) else None
        self.dst_arrays = page_arrays(pool.layers) if self.staging is None else []
        super().__init__(pool, on_event, host, io_timeout, guard)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("tcp", self.host, self.port, self.pool.num_pages)

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        expected = len(msg.dst_pages) * len(self.pool.layers) * self.pool.page_bytes()
        if msg.nbytes != expected:  # the stream cannot be re-synchronised
            raise ConnectionError(f"room {msg.room}: frame announces {msg.nbytes} bytes, {expected} expected")
        if any(not 0 <= p < self.pool.num_pages for p in msg.dst_pages):
            _discard(sock, msg.nbytes)
            return f"destination page outside [0, {self.pool.num_pages})"
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is None:
            _discard(sock, msg.nbytes)
            return error
        try:
            if self.staging is not None:
                self.staging.receive(sock, msg.dst_pages)  # returns once the pages have landed
            else:
                recv_buffers(sock, page_buffers(self.dst_arrays, msg.dst_pages))
        finally:
            self.end_write(slot)
        return None


def _discard(sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, DISCARD_CHUNK)))
    while nbytes > 0:
        got = sock.recv_into(scratch[: min(nbytes, len(scratch))])
        if got == 0:
            raise ConnectionError("peer closed the connection in the middle of a frame")
        nbytes -= got
