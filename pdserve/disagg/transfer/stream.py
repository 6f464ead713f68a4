"""The ordered byte stream both built-in backends use: one TCP connection per (sender, receiver).

A connection starts with a handshake: the receiver sends a random challenge, the sender answers
with its MAC under the deployment's secret (:mod:`pdserve.disagg.auth`), the receiver confirms with one
byte (so a sender with the wrong secret fails at once, named); the receiver reads no frame
before that, closes connections that do not authenticate within the guard's handshake timeout,
closes authenticated ones that carry no frame for its idle timeout while none of their rooms is
open (senders keep connections between rooms, and drop and reopen one that carries no room and sat
idle half that long, or that the receiver closed, before reuse; a connection that carries a room
— a frame of it went out and its ``Status`` did not yet — is never idle on either end, so a room
whose pages come long after its ``Accepted`` keeps its connection), and accepts at most
``max_connections`` at once. Frames are
``u32 little-endian header length | msgpack header (StreamMsg) | payload``; a header may not exceed
:func:`max_header_bytes` of the receiving pool. Only a
``Pages`` header with ``nbytes > 0`` has a payload: the pages' bytes, layer by layer, pages in list
order. :class:`StreamSender` runs one thread per receiver so a slow peer delays only its own
rooms, with two lanes: control frames (``Accepted``, a failed ``Status``: see :func:`is_control`) go
out before any queued bulk job (pages, ``Aux``, a successful ``Status``, which must follow its room's
pages), so a room's acknowledgement never waits behind another room's large transfer; and one liveness thread that watches every connection it holds (the receiver writes nothing
after the handshake but the one-byte goodbye of a deliberate close, so a readable connection has ended
or is being closed on purpose, which is not a loss; TCP keepalive probes every :data:`KEEPALIVE_S` s, dropped after :data:`KEEPALIVE_PROBES` unanswered, catch a silent host) and
reports a lost receiver through ``on_lost`` at once, even while its thread is busy or idle;
:class:`StreamReceiver` runs one thread per incoming connection. Subclasses decide how page
bytes travel (:meth:`StreamSender.write_pages`, :meth:`StreamReceiver.read_pages`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.auth import CHALLENGE_BYTES, MAC_BYTES, AuthError
from pdserve.disagg.transfer.base import (
    KVReceiver,
    KVSender,
    PeerLost,
    ReceiverEvent,
    ReceiverLost,
    SendResult,
)
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.validation import MAX_TOP_LOGPROBS
from pdserve.ports import bound_socket, no_delay

logger = logging.getLogger("pdserve.disagg.transfer")

HEADER = struct.Struct("<I")
STREAM_PURPOSE = b"kv-stream"
HANDSHAKE_OK = b"\x01"  # the receiver accepted the sender's proof
# The one byte a receiver writes after the handshake: "alive, but closing this connection on purpose" (it
# sat idle, or a closed room's write was stuck on it). The sender's liveness thread then lets it go quietly
# (the next room reconnects) instead of reporting the receiver lost, which would fail every room bound to
# that receiver, not only those the connection carried.
GOODBYE = b"\x02"
IOV_BATCH = 512  # buffers per sendmsg/recvmsg_into call (IOV_MAX is 1024 on Linux)
SOCKET_BUFFER_BYTES = 4 << 20
CONNECT_TIMEOUT_S = 5.0
# Test hook: every page send waits this long first, so tests can hold pages "queued for transfer".
TEST_SEND_DELAY_S = float(os.environ.get("PDSERVE_TEST_KV_SEND_DELAY_S") or 0)
# ... only sends of at least this many pages (so one test's long prompt is held while short ones pass)
TEST_SEND_DELAY_MIN_PAGES = int(os.environ.get("PDSERVE_TEST_KV_SEND_DELAY_MIN_PAGES") or 0)
CLOSE_WAIT_S = 5.0  # close_room waits this long for a write in progress before cutting its connection
LIVENESS_POLL_S = 0.2  # the sender's liveness thread looks at its connections this often
KEEPALIVE_S = 5  # TCP keepalive: idle time before the first probe and between probes (SGLang beats every 5 s)
KEEPALIVE_PROBES = 2  # unanswered probes before the kernel drops the connection


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """``[(first, count)]`` of consecutive page indices, in list order."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def paired_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``[(src_first, dst_first, count)]`` where both lists advance by one together."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def page_arrays(layers: list[torch.Tensor]) -> list[np.ndarray]:
    """Each layer as a ``[num_pages, page_bytes]`` uint8 array sharing the tensor's memory."""
    return [layer.view(torch.uint8).reshape(layer.shape[0], -1).numpy() for layer in layers]


def page_buffers(arrays: list[np.ndarray], pages: list[int]) -> list[memoryview]:
    """Flat byte views of ``pages`` of every layer, layer-major, consecutive pages merged."""
    spans = runs(pages)
    return [memoryview(arr[first : first + count].reshape(-1)) for arr in arrays for first, count in spans]


def send_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Send every buffer, in order, with gathered writes."""
    bufs = [b for b in buffers if b.nbytes]
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + IOV_BATCH])
        while sent:
            size = bufs[i].nbytes
            if sent >= size:
                sent -= size
                i += 1
            else:
                bufs[i] = bufs[i][sent:]
                sent = 0


def recv_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Fill every buffer, in order, with scattered reads."""
    bufs = [b for b in buffers if b.nbytes]
    i = 0
    while i < len(bufs):
        got = sock.recvmsg_into(bufs[i : i + IOV_BATCH])[0]
        if got == 0:
            raise ConnectionError("peer closed the connection in the middle of a frame")
        while got:
            size = bufs[i].nbytes
            if got >= size:
                got -= size
                i += 1
            else:
                bufs[i] = bufs[i][got:]
                got = 0


def recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes, or None on a clean end of stream before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError("peer closed the connection in the middle of a frame")
        got += k
    return buf


def peer_closed(sock: socket.socket) -> bool:
    """Whether a sender's connection was closed by its receiver (which writes nothing after the handshake
    but the goodbye of a deliberate close, so anything readable is the end of the stream)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


# msgpack bytes of one prompt token's input logprobs at most: id and value, and MAX_TOP_LOGPROBS (id, value) pairs
INPUT_LOGPROB_BYTES = 9 + 9 + 5 + MAX_TOP_LOGPROBS * (1 + 9 + 9)


def max_header_bytes(num_pages: int, page_size: int = 1) -> int:
    """Largest frame header a receiver with ``num_pages`` pages of ``page_size`` tokens reads: a page
    list (at most 9 bytes of msgpack per page), or an ``Aux`` with the input logprobs of a prompt that
    fills the pool, plus room for a reason string and one token's logprobs."""
    return (64 << 10) + 9 * num_pages + INPUT_LOGPROB_BYTES * num_pages * page_size


def is_control(msg: m.StreamMsg) -> bool:
    """Whether a message takes the control lane, ahead of queued bulk jobs: an ``Accepted`` (the first
    frame of its room) or a failed ``Status`` (its room's queued sends are cancelled before it is sent).
    A successful ``Status`` and ``Aux`` stay in order behind their room's pages."""
    return isinstance(msg, m.Accepted) or (isinstance(msg, m.Status) and not msg.ok)


def frame(msg: m.StreamMsg) -> list[memoryview]:
    header = m.encode(msg)
    return [memoryview(HEADER.pack(len(header))), memoryview(header)]


# ---------------------------------------------------------------------- sender


@dataclass
class _Job:
    room: int
    kind: str
    src_pages: list[int] = field(default_factory=list)
    dst_pages: list[int] = field(default_factory=list)
    msg: m.StreamMsg | None = None
    tag: Any = None
    cancelled: bool = False


class _Destination:
    """One receiver: a control and a bulk lane, a thread and a (re)connected socket."""

    def __init__(self, sender: StreamSender, info: m.ReceiverInfo) -> None:
        self.sender = sender
        self.info = info
        self._ready = threading.Condition()
        self._control: deque[_Job] = deque()
        self._bulk: deque[_Job | None] = deque()  # None: stop once what was queued before is done
        self.sock: socket.socket | None = None
        self.last_used = 0.0  # time.monotonic() when the connection last carried a job
        # rooms the connection carries: a frame of theirs went out on it and their Status did not yet. The
        # receiver fails them all if the connection ends, so it is not dropped for idleness while any is open.
        self.rooms: set[int] = set()
        self.thread = threading.Thread(target=self._run, name=f"kv-send-{info.address}", daemon=True)
        self.thread.start()

    def idle(self) -> bool:
        """Whether the kept connection may be closing at the receiver: it carries no room and sat unused
        for half the receivers' idle bound (the receiver closes one idle for the whole bound)."""
        return not self.rooms and time.monotonic() - self.last_used > self.sender.idle_timeout / 2

    def connect(self) -> socket.socket:
        if self.sock is not None and (self.idle() or peer_closed(self.sock)):
            self.drop_connection()  # the receiver closes idle connections: reconnect rather than write into one
        if self.sock is None:
            try:
                sock = socket.create_connection((self.info.host, self.info.port), timeout=CONNECT_TIMEOUT_S)
            except OSError as e:
                raise ConnectionError(f"cannot connect to decode receiver {self.info.address}: {e}") from e
            no_delay(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
            sock.settimeout(self.sender.io_timeout)
            try:
                challenge = recv_exact(sock, CHALLENGE_BYTES)
                if challenge is None or len(challenge) != CHALLENGE_BYTES:
                    raise ConnectionError("closed before the handshake (over its connection cap?)")
                sock.sendall(self.sender.auth.respond(STREAM_PURPOSE, bytes(challenge)))
                if recv_exact(sock, 1) != HANDSHAKE_OK:
                    raise ConnectionError("the receiver refused our proof (is --disaggregation-secret the same?)")
            except (OSError, ConnectionError) as e:
                sock.close()
                raise ConnectionError(f"handshake with decode receiver {self.info.address} failed: {e}") from e
            self.sock = sock
            self.sender._watch(self, sock)
        return self.sock

    def drop_connection(self) -> None:
        if self.sock is not None:
            self.sender._unwatch(self.sock)
            self.sock.close()
            self.sock = None
        self.rooms.clear()  # the receiver reports what the connection carried lost

    def carried(self, job: _Job) -> None:
        """Account a frame that went out on the connection: its room is open on it until its Status."""
        if job.kind == "message" and isinstance(job.msg, m.Status):
            self.rooms.discard(job.room)
        else:
            self.rooms.add(job.room)

    def put(self, job: _Job | None) -> None:
        """Queue a job (control frames ahead of bulk ones), or None to stop after the queued bulk jobs."""
        with self._ready:
            lane = self._control if job is not None and job.kind == "message" and is_control(job.msg) else self._bulk
            lane.append(job)
            self._ready.notify()

    def _next(self) -> _Job | None:
        with self._ready:
            self._ready.wait_for(lambda: self._control or self._bulk)
            return self._control.popleft() if self._control else self._bulk.popleft()

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self.drop_connection()
                return
            self.sender._execute(self, job)
            self.last_used = time.monotonic()


class StreamSender(KVSender):
    """Sender half of the stream; subclasses implement :meth:`write_pages`."""

    def __init__(self, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float, auth=None,
                 idle_timeout: float = 60.0) -> None:
        super().__init__(pool, on_done, io_timeout, auth, idle_timeout)
        self._lock = threading.Lock()
        self._dests: dict[str, _Destination] = {}
        self._pending: dict[int, list[_Job]] = {}
        self._closed = False
        self._watched: dict[int, tuple[socket.socket, _Destination]] = {}  # fd -> connection (under _lock)
        self._liveness = threading.Thread(target=self._watch_connections, name="kv-send-liveness", daemon=True)
        self._liveness.start()

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        """Move the job's pages to the receiver and send its ``Pages`` notification; returns bytes moved."""
        raise NotImplementedError

    def send_pages(
        self, dst: m.ReceiverInfo, room: int, src_pages: list[int], dst_pages: list[int], tag: Any = None
    ) -> None:
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"room {room}: {len(src_pages)} source pages for {len(dst_pages)} destination pages")
        self._queue(dst, _Job(room, "pages", list(src_pages), list(dst_pages), tag=tag))

    def send_message(self, dst: m.ReceiverInfo, msg: m.StreamMsg, tag: Any = None) -> None:
        self._queue(dst, _Job(msg.room, "message", msg=msg, tag=tag))

    def cancel(self, room: int) -> None:
        with self._lock:
            for job in self._pending.get(room, ()):
                job.cancelled = True

    def _queue(self, dst: m.ReceiverInfo, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("KV sender is closed")
            dest = self._dests.get(dst.address)
            if dest is None:
                dest = self._dests[dst.address] = _Destination(self, dst)
            self._pending.setdefault(job.room, []).append(job)
        dest.put(job)

    def _execute(self, dest: _Destination, job: _Job) -> None:
        start = time.perf_counter()
        result = SendResult(job.room, job.kind, tag=job.tag)
        if job.kind == "pages" and TEST_SEND_DELAY_S and len(job.src_pages) >= TEST_SEND_DELAY_MIN_PAGES:
            until = time.monotonic() + TEST_SEND_DELAY_S
            while not job.cancelled and time.monotonic() < until:  # cancelling cuts the hook's delay short
                time.sleep(min(0.01, TEST_SEND_DELAY_S))
        if job.cancelled or self._closed:
            result.cancelled = True
        else:
            try:
                if job.kind == "pages":
                    result.nbytes = self.write_pages(dest, job)
                else:
                    send_buffers(dest.connect(), frame(job.msg))
                dest.carried(job)
            except Exception as e:  # any failure fails this job; the next one reconnects
                dest.drop_connection()
                result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        result.seconds = time.perf_counter() - start
        result.done_at = time.monotonic()
        with self._lock:
            jobs = self._pending.get(job.room)
            if jobs is not None:
                jobs.remove(job)
                if not jobs:
                    del self._pending[job.room]
        try:
            self.on_done(result)
        except Exception:
            logger.exception("KV sender completion callback failed")

    # ------------------------------------------------------------------ liveness
    def _watch(self, dest: _Destination, sock: socket.socket) -> None:
        with self._lock:
            self._watched[sock.fileno()] = (sock, dest)

    def _unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._watched.get(sock.fileno(), (None,))[0] is sock:
                del self._watched[sock.fileno()]

    def _watch_connections(self) -> None:
        """Report a receiver whose connection ended (or whose host stopped answering keepalives)."""
        while not self._closed:
            with self._lock:
                polled = dict(self._watched)
            if not polled:
                time.sleep(LIVENESS_POLL_S)
                continue
            poller = select.poll()
            for fd in polled:
                poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            try:
                ready = poller.poll(LIVENESS_POLL_S * 1000)
            except OSError:
                continue
            for fd, _ in ready:
                with self._lock:
                    watched = self._watched.get(fd)
                if watched is None or watched[0] is not polled[fd][0]:
                    # the sender thread dropped it meanwhile, and the fd may already number a new connection:
                    # what was polled is not that one
                    continue
                sock, dest = watched
                reason = _ended(sock)
                if reason is None:
                    continue
                self._unwatch(sock)
                if reason is CLOSED_ON_PURPOSE:  # not a death: the destination thread reconnects for its next room
                    logger.debug("KV receiver %s closed a connection on purpose", dest.info.address)
                    continue
                with contextlib.suppress(OSError):  # a send blocked on it fails now
                    sock.shutdown(socket.SHUT_RDWR)
                logger.info("KV receiver %s lost: %s", dest.info.address, reason)
                if self.on_lost is not None and not self._closed:
                    try:
                        self.on_lost(ReceiverLost(dest.info.address, reason))
                    except Exception:
                        logger.exception("KV sender liveness callback failed")
            if ready:
                time.sleep(0.01)  # a socket that stays readable without having ended must not make this spin

    def close(self) -> None:
        with self._lock:
            self._closed = True
            dests = list(self._dests.values())
            self._dests.clear()
        for dest in dests:
            dest.put(None)
        for dest in dests:
            dest.thread.join(CLOSE_WAIT_S)


CLOSED_ON_PURPOSE = "the receiver closed the connection on purpose (idle, or a stuck write of a closed room)"


def _ended(sock: socket.socket) -> str | None:
    """Why a connection the receiver writes to after the handshake only to say goodbye is readable:
    :data:`CLOSED_ON_PURPOSE`, or the reason it ended or failed (None: nothing is wrong after all).
    Never blocks: on a socket with a timeout, Python's ``recv`` first waits up to that timeout for
    data even with ``MSG_DONTWAIT``, so readiness is checked without waiting first."""
    check = select.poll()
    check.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    try:
        if not check.poll(0):
            return None
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError, TimeoutError):
        return None
    except OSError as e:
        if e.errno == errno.ETIMEDOUT:
            return (f"its host stopped answering ({KEEPALIVE_PROBES} TCP keepalive probes {KEEPALIVE_S} s apart "
                    "went unanswered)")
        return f"the connection failed: {e.strerror or e}"
    if not data:
        return "the decode receiver closed the connection (its process died or restarted)"
    if data == GOODBYE:
        return CLOSED_ON_PURPOSE
    return "the decode receiver wrote on the connection, which the protocol forbids"


# ---------------------------------------------------------------------- receiver


@dataclass
class _Slot:
    pages: set[int]
    busy: int = 0
    conn: socket.socket | None = None


class StreamReceiver(KVReceiver):
    """Receiver half of the stream; subclasses implement :meth:`read_pages`."""

    def __init__(
        self, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float, guard=None
    ) -> None:
        super().__init__(pool, on_event, host, io_timeout, guard)
        self.max_header = max_header_bytes(pool.num_pages, pool.page_size)
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.listener = bound_socket(host, 0)  # TCP_NODELAY, inherited by every accepted connection
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept, name=f"kv-recv-{self.port}", daemon=True)
        self._accept_thread.start()

    def read_pages(self, sock: socket.socket, msg: m.Pages) -> str | None:
        """Consume the frame's payload (writing it into the room's pages if still open); an error
        string when the frame is unacceptable for the room."""
        raise NotImplementedError

    # ------------------------------------------------------------------ rooms
    def open_room(self, room: int, pages: list[int]) -> None:
        with self._cond:
            self._slots[room] = _Slot(set(pages))

    def close_room(self, room: int) -> bool:
        with self._cond:
            slot = self._slots.pop(room, None)
            stuck = slot is not None and not self._cond.wait_for(lambda: slot.busy == 0, CLOSE_WAIT_S)
            if stuck and slot.conn is not None:
                logger.warning("room %d: write still in progress after %.0f s, cutting its connection", room, CLOSE_WAIT_S)
                with contextlib.suppress(OSError):  # alive: the sender must not take the cut for a death
                    slot.conn.send(GOODBYE, socket.MSG_DONTWAIT)
                with contextlib.suppress(OSError):
                    slot.conn.shutdown(socket.SHUT_RDWR)
                self._cond.wait_for(lambda: slot.busy == 0, CLOSE_WAIT_S)
        return self.close_stops_writes

    def begin_write(self, room: int, dst_pages: list[int], sock: socket.socket) -> tuple[_Slot | None, str | None]:
        """Reserve the room's pages for one frame: (slot, None), or (None, None) to discard the
        payload of a closed room, or (None, error) for pages outside the room."""
        with self._cond:
            slot = self._slots.get(room)
            if slot is None:
                return None, None
            if not slot.pages.issuperset(dst_pages):
                return None, f"sender wrote pages outside the room's {len(slot.pages)} pages"
            slot.busy += 1
            slot.conn = sock
            return slot, None

    def end_write(self, slot: _Slot) -> None:
        with self._cond:
            slot.busy -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ connections
    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                return
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                full = len(self._conns) >= self.guard.max_connections
                if not full:
                    self._conns.add(sock)
            if full:
                self.guard.refusals.record(f"KV receiver {self.port}", "connection_cap",
                                           f"{self.guard.max_connections} connections already open")
                sock.close()
                continue
            no_delay(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            threading.Thread(target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        open_rooms: set[int] = set()
        reason = "the sender closed the connection"
        listener = f"KV receiver {self.port}"
        try:
            sock.settimeout(self.guard.handshake_timeout)
            challenge = self.guard.auth.challenge()
            sock.sendall(challenge)
            response = recv_exact(sock, MAC_BYTES)
            self.guard.auth.check_response(STREAM_PURPOSE, challenge, bytes(response or b""))
            sock.sendall(HANDSHAKE_OK)
            sock.settimeout(None)
        except (OSError, ConnectionError, AuthError) as e:
            why = "unauthenticated" if isinstance(e, AuthError) else "handshake_timeout_or_error"
            self.guard.refusals.record(listener, why, f"{peer}: {type(e).__name__}: {e}")
            with self._cond:
                self._conns.discard(sock)
            sock.close()
            return
        try:
            while True:
                if not self._await_frame(sock, open_rooms):
                    self.guard.refusals.record(listener, "idle_timeout",
                                               f"{peer}: no frame for {self.guard.idle_timeout:g} s")
                    reason = f"idle for {self.guard.idle_timeout:g} s"
                    with contextlib.suppress(OSError):
                        sock.sendall(GOODBYE)
                    break
                head = recv_exact(sock, HEADER.size)
                if head is None:
                    break
                (size,) = HEADER.unpack(head)
                if size > self.max_header:
                    self.guard.refusals.record(listener, "oversized_frame", f"{peer}: {size} bytes")
                    raise ConnectionError(f"frame header of {size} bytes exceeds {self.max_header}")
                msg = m.decode_stream(recv_exact(sock, size) or b"")
                if isinstance(msg, m.Pages):
                    error = self.read_pages(sock, msg)
                    if error is not None:
                        msg = m.Status(msg.room, False, f"bad KV pages frame from {peer}: {error}", m.Cause.TRANSFER_ERROR)
                if isinstance(msg, m.Status):
                    open_rooms.discard(msg.room)
                else:
                    open_rooms.add(msg.room)
                self.on_event(msg)
        except Exception as e:  # a broken stream fails the rooms it carried
            reason = f"{type(e).__name__}: {e}"
        finally:
            with self._cond:
                self._conns.discard(sock)
            sock.close()
        if open_rooms and not self._closed:
            self.on_event(PeerLost(sorted(open_rooms), peer, reason))

    def _await_frame(self, sock: socket.socket, open_rooms: set[int]) -> bool:
        """Wait until the connection is readable; False once it stayed silent for the idle timeout
        while none of the rooms it carries is still open here."""
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLRDHUP)
        while not poller.poll(self.guard.idle_timeout * 1000):
            with self._cond:
                live = any(room in self._slots for room in open_rooms)
            if not live:
                return False
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._accept_thread.join(CLOSE_WAIT_S)
