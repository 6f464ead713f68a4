"""``shm`` backend: prefill writes pages straight into the decode pool through shared memory.

The decode pool's layers live in one ``/dev/shm`` file (:meth:`KVPool.to_shared_memory`); the
prefill rank maps that file and copies page runs into it — one ``memmove`` per run of consecutive
pages (it releases the GIL and costs far less per call than a tensor op), or, when runs are many
and short, one numpy gather/scatter per layer — then notifies decode on the stream.
Same host only. Since the writer is another process, closing a room does not stop in-flight
writes: decode keeps such pages until prefill's final ``Status`` for the room (or a timeout).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket

import numpy as np

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    paired_runs,
    send_buffers,
)

SHORT_RUN_BYTES = 32 << 10  # below this average run size, gather/scatter beats one memmove per run


class ShmSender(StreamSender):
    backend = "shm"

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        dst = self._mapped(dest)
        page_bytes = self.pool.page_bytes()
        spans = paired_runs(job.src_pages, job.dst_pages)
        if len(spans) > 8 and len(job.src_pages) * page_bytes < SHORT_RUN_BYTES * len(spans):
            src_index, dst_index = np.array(job.src_pages), np.array(job.dst_pages)
            for layer, src in enumerate(self.src_arrays):
                dst[layer][dst_index] = src[src_index]
        else:
            for layer, src in enumerate(self.src_arrays):
                src_base, dst_base = src.ctypes.data, dst[layer].ctypes.data
                for s, d, count in spans:
                    ctypes.memmove(dst_base + d * page_bytes, src_base + s * page_bytes, count * page_bytes)
        send_buffers(dest.connect(), frame(m.Pages(job.room, job.dst_pages, 0)))
        return len(job.src_pages) * len(self.src_arrays) * page_bytes

    def _mapped(self, dest: _Destination) -> np.ndarray:
        """The receiver's pool as ``[layers, pages, page_bytes]`` bytes, mapped once per destination."""
        info = dest.info
        cached = getattr(dest, "shm_map", None)
        if cached is not None and cached[0] == info.shm_path:
            return cached[1]
        if info.shm_path is None:
            raise ConnectionError(f"decode receiver {info.address} published no shared-memory segment")
        num_layers, page_bytes = len(self.src_arrays), self.pool.page_bytes()
        size = num_layers * info.num_pages * page_bytes
        try:
            fd = os.open(info.shm_path, os.O_RDWR)
        except OSError as e:
            raise ConnectionError(
                f"cannot open decode's KV segment {info.shm_path}: {e} (the shm backend needs prefill and "
                "decode on the same host; use --disaggregation-transfer-backend tcp otherwise)"
            ) from e
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ConnectionError(f"decode's KV segment {info.shm_path} has {actual} bytes, expected {size}")
            region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        view = np.frombuffer(region, dtype=np.uint8).reshape(num_layers, info.num_pages, page_bytes)
        dest.shm_map = (info.shm_path, view)
        return view


class ShmReceiver(StreamReceiver):
    backend = "shm"
    close_stops_writes = False  # the prefill process writes into our memory on its own

    def __init__(self, pool, *args, **kwargs) -> None:
        pool.to_shared_memory()
        super().__init__(pool, *args, **kwargs)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("shm", self.host, self.port, self.pool.num_pages, self.pool.shm_path)

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        if msg.nbytes:
            raise ConnectionError(f"room {msg.room}: shm stream frames carry no payload, got {msg.nbytes} bytes")
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is not None:
            self.end_write(slot)
        return error
