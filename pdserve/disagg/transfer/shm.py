"""``shm`` backend: prefill writes pages straight into the decode pool through shared memory.

The decode pool's layers live in one ``/dev/shm`` file (:meth:`KVPool.to_shared_memory`); the
prefill rank maps that file and copies page runs into it — one ``memmove`` per run of consecutive
pages (it releases the GIL and costs far less per call than a tensor op), or, when runs are many
and short, one numpy gather/scatter per layer — then notifies decode on the stream.
Same host only.

What prefill maps is never a path from the wire: the KV request (sealed with the deployment's
secret) names the decode process, its descriptor and the segment's random id (:class:`ShmSegment`);
prefill builds ``/proc/{pid}/fd/{fd}`` itself and maps it read-write only if that descriptor is the
unlinked ``/dev/shm/pdserve-kv-{pid}-{segment}``, of exactly the pool's size, and its trailer
carries the segment id with a MAC under the secret that only the decode side could have written.
Since the writer is another process, closing a room does not stop in-flight
writes: decode keeps such pages until prefill's final ``Status`` for the room (or a timeout).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import socket
import stat

import numpy as np

from pdserve.disagg import messages as m
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    page_arrays,
    paired_runs,
    send_buffers,
)
from pdserve.engine.kv_pool import SHM_DIR, SHM_PREFIX, SHM_TRAILER_BYTES

SHORT_RUN_BYTES = 32 << 10  # below this average run size, gather/scatter beats one memmove per run
TRAILER_MAGIC = b"PDSERVE-KV-SEGMENT\0"
SEGMENT_ID = re.compile(r"[0-9a-f]{24}")


def segment_trailer(auth: PlaneAuth, segment: str, data_bytes: int) -> bytes:
    """The proof a decode pool writes after its layers: magic, segment id, and their MAC with the size."""
    ident = segment.encode()
    return TRAILER_MAGIC + ident + auth.respond(b"shm-segment", ident + str(data_bytes).encode())


def open_segment(auth: PlaneAuth, seg: m.ShmSegment, data_bytes: int) -> mmap.mmap:
    """Map the decode pool that ``seg`` describes, read-write, after checking it is one (see module doc)."""
    if not (SEGMENT_ID.fullmatch(seg.segment) and 0 < seg.pid < 1 << 22 and 0 <= seg.fd < 1 << 20):
        raise ConnectionError(f"malformed shared-memory segment description {seg}")
    path = f"/proc/{seg.pid}/fd/{seg.fd}"
    expected_name = os.path.join(SHM_DIR, f"{SHM_PREFIX}{seg.pid}-{seg.segment}")
    try:
        target = os.readlink(path)
    except OSError as e:
        raise ConnectionError(f"cannot reach decode's KV segment {seg.segment} (pid {seg.pid}): {e} (the shm "
                              "backend needs prefill and decode on the same host; use the tcp backend otherwise)") from e
    if target not in (expected_name, f"{expected_name} (deleted)"):
        raise ConnectionError(f"descriptor {seg.fd} of pid {seg.pid} is not KV segment {seg.segment}; refused")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = data_bytes + SHM_TRAILER_BYTES
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ConnectionError(f"decode's KV segment {seg.segment} has {st.st_size} bytes, expected {size}")
        proof = segment_trailer(auth, seg.segment, data_bytes)
        if os.pread(fd, len(proof), data_bytes) != proof:
            raise ConnectionError(f"decode's KV segment {seg.segment} carries no proof of this deployment's "
                                  "secret; refused")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


class ShmSender(StreamSender):
    backend = "shm"

    def __init__(self, pool, *args, **kwargs) -> None:
        super().__init__(pool, *args, **kwargs)
        self.src_arrays = page_arrays(pool.layers)

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
        if cached is not None and cached[0] == info.shm:
            return cached[1]
        if info.shm is None:
            raise ConnectionError(f"decode receiver {info.address} published no shared-memory segment")
        num_layers, page_bytes = len(self.src_arrays), self.pool.page_bytes()
        data_bytes = num_layers * info.num_pages * page_bytes
        region = open_segment(self.auth, info.shm, data_bytes)
        view = np.frombuffer(region, dtype=np.uint8)[:data_bytes].reshape(num_layers, info.num_pages, page_bytes)
        dest.shm_map = (info.shm, view)
        return view


class ShmReceiver(StreamReceiver):
    backend = "shm"
    close_stops_writes = False  # the prefill process writes into our memory on its own

    def __init__(self, pool, *args, **kwargs) -> None:
        pool.to_shared_memory()
        super().__init__(pool, *args, **kwargs)
        data_bytes = pool.bytes_total()
        os.pwrite(pool.shm_fd, segment_trailer(self.guard.auth, pool.shm_segment, data_bytes), data_bytes)

    def info(self) -> m.ReceiverInfo:
        segment = m.ShmSegment(os.getpid(), self.pool.shm_fd, self.pool.shm_segment)
        return m.ReceiverInfo("shm", self.host, self.port, self.pool.num_pages, segment)

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        if msg.nbytes:
            raise ConnectionError(f"room {msg.room}: shm stream frames carry no payload, got {msg.nbytes} bytes")
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is not None:
            self.end_write(slot)
        return error
