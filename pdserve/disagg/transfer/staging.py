"""Host staging of KV pages for the ``tcp`` backend when the pool is not host memory (a GPU pool).

A socket reads and writes host memory only, so a device pool's pages cross a bounded host buffer
(pinned when CUDA is available, so the copies are asynchronous DMA): the sender gathers the pages of
each layer on the device (``index_select``) and copies them into the buffer on the buffer's own
CUDA stream, synchronises it, then writes the buffer on the socket; the receiver reads the payload
into the buffer and scatters it into the destination pages (``index_copy_``) on the buffer's
stream, and synchronises it before the frame is reported (and before the room's write fence is
released), so no decode step reads a page before its bytes have landed. The bytes on the wire are
exactly the unstaged layout (layer by layer, pages in list order): a staged sender may feed an
unstaged receiver and the other way round.

A frame's payload is cut into pieces of at most half a buffer (never less than one page of every
layer); the two halves alternate, so on a GPU the device copy of one piece overlaps the socket I/O
of the previous one. Each frame in progress holds one buffer of ``max_bytes``; idle buffers are kept
for reuse (at most :data:`IDLE_BUFFERS`), so host memory is bounded by ``max_bytes`` times the frames
moving at once (one per connection). Ordering on the sender needs nothing more than what prefill
already does: it waits for the step's ``kv_written`` event before it queues pages to send.

The same code runs on a CPU pool when staging is forced (tests, ``pdserve bench transfer --backend
tcp-staged``, or the test hook ``PDSERVE_TEST_KV_STAGING=1``); only the streams and the pinning are
CUDA-specific.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.disagg.transfer.stream import recv_buffers, send_buffers
from pdserve.engine.kv_pool import KVPool

logger = logging.getLogger("pdserve.disagg.transfer")

DEFAULT_STAGING_BYTES = 16 << 20  # one buffer: two halves of 8 MiB (a GPU's copy of one overlaps the socket on the other)
IDLE_BUFFERS = 4  # buffers kept for reuse when no frame holds them (pinning a new one takes milliseconds)
# Test hook: stage every tcp transfer, even of a CPU pool, so the GPU path runs on a CPU machine.
TEST_FORCE_STAGING = os.environ.get("PDSERVE_TEST_KV_STAGING") == "1"


def needs_staging(pool: KVPool, force: bool | None = None) -> bool:
    """Whether the tcp backend must stage ``pool``'s pages through host memory: when they are not in
    host memory, or when ``force`` (None: the test hook) says so."""
    if force is None:
        force = TEST_FORCE_STAGING
    return force or pool.device.type != "cpu"


@dataclass
class _Segment:
    """Pages ``[first, end)`` of a frame's page list, of one layer, at ``offset`` slots into a half buffer."""

    layer: int
    first: int
    end: int
    offset: int


@dataclass
class _Buffer:
    halves: tuple[torch.Tensor, torch.Tensor]  # [slots, page] of :attr:`PageStaging.word` each, host memory
    views: tuple[np.ndarray, np.ndarray]  # the same memory as [slots, page_bytes] bytes, for the socket
    stream: torch.cuda.Stream | None  # the buffer's own copy stream (None on a CPU pool)
    events: list[torch.cuda.Event | None]  # per half: the device copy that last used it


class PageStaging:
    """Moves a frame's page bytes between a pool and a socket through bounded host buffers."""

    def __init__(self, pool: KVPool, max_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        if not pool.layers:
            raise ValueError("KV staging needs a pool with storage")
        self.device = pool.layers[0].device  # with its index (a thread's current CUDA device may differ)
        self.page_bytes = pool.page_bytes()
        self.num_layers = len(pool.layers)
        self.half_slots = max(self.num_layers, max_bytes // 2 // self.page_bytes)  # one page of every layer at least
        self.max_bytes = 2 * self.half_slots * self.page_bytes
        # Rows of whole pages, copied as the widest integers that divide a page: per-byte indexed copies
        # are several times slower (index_copy_ of uint8 on a CPU).
        self.word = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                         if self.page_bytes % t.itemsize == 0)
        self.layers = [layer.view(torch.uint8).reshape(layer.shape[0], -1).view(self.word) for layer in pool.layers]
        self.pinned = torch.cuda.is_available()
        logger.info("tcp KV transfer: pages of the %s pool cross %s host buffers of %.1f MiB (one per frame in flight)",
                    self.device, "pinned" if self.pinned else "pageable", self.max_bytes / 2**20)
        self._idle: list[_Buffer] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sender
    def send(self, sock: socket.socket, pages: list[int], prefix: list[memoryview]) -> None:
        """Write ``prefix`` (the frame header) then the bytes of ``pages`` of every layer on ``sock``."""
        pieces = list(self._pieces(len(pages)))
        with self._buffer() as buf:
            index = self._index(buf, pages)
            pending: tuple[int, int] | None = None  # (half, slots) gathered, not yet sent
            for k, piece in enumerate(pieces):
                half = k % 2
                with _on(buf.stream):
                    for seg in piece:
                        self._gather(index, seg, buf.halves[half])
                buf.events[half] = _record(buf.stream)
                if pending is not None:
                    prefix = self._send_half(sock, buf, *pending, prefix)
                pending = (half, sum(s.end - s.first for s in piece))
            if pending is not None:
                prefix = self._send_half(sock, buf, *pending, prefix)
            if prefix:
                send_buffers(sock, prefix)

    def _gather(self, index: torch.Tensor, seg: _Segment, half: torch.Tensor) -> None:
        out = half[seg.offset : seg.offset + seg.end - seg.first]
        rows = index[seg.first : seg.end]
        if self.device.type == "cpu":
            torch.index_select(self.layers[seg.layer], 0, rows, out=out)
        else:
            out.copy_(torch.index_select(self.layers[seg.layer], 0, rows), non_blocking=True)

    def _send_half(self, sock: socket.socket, buf: _Buffer, half: int, slots: int,
                   prefix: list[memoryview]) -> list[memoryview]:
        event = buf.events[half]
        if event is not None:
            event.synchronize()  # the bytes are in host memory before they go on the socket
        send_buffers(sock, [*prefix, memoryview(buf.views[half][:slots].reshape(-1))])
        return []

    # ------------------------------------------------------------------ receiver
    def receive(self, sock: socket.socket, pages: list[int]) -> None:
        """Read the bytes of ``pages`` of every layer from ``sock`` into the pool; returns (or raises)
        only once no copy into the pool is in flight any more."""
        with self._buffer() as buf:
            index = self._index(buf, pages)
            try:
                for k, piece in enumerate(self._pieces(len(pages))):
                    half = k % 2
                    event = buf.events[half]
                    if event is not None:
                        event.synchronize()  # the previous scatter from this half has read it
                    slots = sum(s.end - s.first for s in piece)
                    recv_buffers(sock, [memoryview(buf.views[half][:slots].reshape(-1))])
                    with _on(buf.stream):
                        for seg in piece:
                            self._scatter(index, seg, buf.halves[half])
                    buf.events[half] = _record(buf.stream)
            finally:
                if buf.stream is not None:
                    buf.stream.synchronize()  # landed (or abandoned) before the frame is reported or fenced

    def _scatter(self, index: torch.Tensor, seg: _Segment, half: torch.Tensor) -> None:
        src = half[seg.offset : seg.offset + seg.end - seg.first]
        rows = index[seg.first : seg.end]
        self.layers[seg.layer].index_copy_(0, rows, src.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ shared
    def _pieces(self, num_pages: int) -> Iterator[list[_Segment]]:
        """The frame's page slots in wire order (layer-major), cut into pieces of at most half a buffer."""
        total = num_pages * self.num_layers
        for start in range(0, total, self.half_slots):
            stop = min(start + self.half_slots, total)
            piece = []
            for layer in range(start // num_pages, (stop - 1) // num_pages + 1):
                first = max(start - layer * num_pages, 0)
                end = min(stop - layer * num_pages, num_pages)
                piece.append(_Segment(layer, first, end, layer * num_pages + first - start))
            yield piece

    def _index(self, buf: _Buffer, pages: list[int]) -> torch.Tensor:
        with _on(buf.stream):  # uploaded on the stream that uses it
            return torch.tensor(pages, dtype=torch.long).to(self.device)

    @contextlib.contextmanager
    def _buffer(self) -> Iterator[_Buffer]:
        with self._lock:
            buf = self._idle.pop() if self._idle else None
        if buf is None:
            halves = tuple(torch.empty(self.half_slots, self.page_bytes, dtype=torch.uint8, pin_memory=self.pinned)
                           for _ in range(2))
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            buf = _Buffer(tuple(h.view(self.word) for h in halves), tuple(h.numpy() for h in halves), stream,
                          [None, None])
        try:
            yield buf
        finally:
            if buf.stream is not None:
                buf.stream.synchronize()  # no copy still uses the buffer when another frame takes it
            buf.events = [None, None]
            with self._lock:
                if len(self._idle) < IDLE_BUFFERS:
                    self._idle.append(buf)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event
