"""``tcp`` backend: page bytes travel on the stream, straight between the two pools.

The sender gathers the source pages' memory into ``sendmsg`` calls; the receiver scatters the
payload with ``recvmsg_into`` directly into the destination pages of its pool — no intermediate
buffer on either side. Works across hosts.
"""

from __future__ import annotations

import socket

from pdserve.disagg import messages as m
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

DISCARD_CHUNK = 1 << 20


class TcpSender(StreamSender):
    backend = "tcp"

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        nbytes = len(job.src_pages) * len(self.src_arrays) * self.pool.page_bytes()
        header = m.Pages(job.room, job.dst_pages, nbytes)
        send_buffers(dest.connect(), frame(header) + page_buffers(self.src_arrays, job.src_pages))
        return nbytes


class TcpReceiver(StreamReceiver):
    backend = "tcp"
    close_stops_writes = True  # only this process writes into the pool

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dst_arrays = page_arrays(self.pool.layers)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("tcp", self.host, self.port, self.pool.num_pages)

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        expected = len(msg.dst_pages) * len(self.dst_arrays) * self.pool.page_bytes()
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
