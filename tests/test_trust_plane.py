"""Trust boundaries of the disaggregation plane, attacked as an unauthenticated local client would:
sealed control messages, bootstrap writes, transfer connections, shm segments and the caps on the
KV receiver (issue 10)."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import threading
import time

import httpx
import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.disagg import messages as m
from pdserve.disagg.auth import AuthError, PlaneAuth
from pdserve.disagg.bootstrap import BootstrapClient, BootstrapError, BootstrapServer
from pdserve.disagg.stats import Refusals
from pdserve.disagg.transfer import PeerLost, ReceiverGuard, SendResult, create_receiver, create_sender
from pdserve.disagg.transfer.shm import open_segment
from pdserve.disagg.transfer.stream import HEADER, STREAM_PURPOSE
from pdserve.engine.kv_pool import SHM_TRAILER_BYTES
from pdserve.engine.request import TokenLogprobs
from tests.test_disagg_transfer import HOST, SHAPE, Collector, filled_pool

SECRET = "s3cret-for-tests"
LAYOUT = filled_pool(0, "float32").layout


def kv_request(room: int = 7) -> m.KVRequest:
    receiver = m.ReceiverInfo("tcp", HOST, 1234, 37)
    return m.KVRequest(room, 0, 0, receiver, [1, 2, 3], 11, "ab", LAYOUT, "tiny")


# ---------------------------------------------------------------------- sealed control messages


def test_control_messages_need_the_secret_and_cannot_be_replayed():
    auth, other = PlaneAuth(SECRET), PlaneAuth("another secret")
    sealed = m.CONTROL.encode(kv_request(), auth)
    assert SECRET.encode() not in sealed
    assert m.CONTROL.decode(sealed, auth) == kv_request()
    with pytest.raises(AuthError, match="replayed"):
        m.CONTROL.decode(sealed, auth)
    with pytest.raises(AuthError, match="signature"):
        m.CONTROL.decode(m.CONTROL.encode(kv_request(), other), auth)
    with pytest.raises(AuthError, match="not a sealed"):
        m.CONTROL.decode(m.encode(kv_request()), auth)  # what an attacker sent before this change
    tampered = bytearray(m.CONTROL.encode(kv_request(), auth))
    tampered[-1] ^= 1
    with pytest.raises(AuthError):
        m.CONTROL.decode(bytes(tampered), auth)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzzed_control_bytes_raise_only_named_errors(data):
    auth = PlaneAuth(None)
    for blob in (data, auth.seal(b"control", data)):
        with contextlib.suppress(AuthError, msgspec.DecodeError, msgspec.ValidationError):
            m.CONTROL.decode(blob, auth)


# ---------------------------------------------------------------------- bootstrap service


@pytest.fixture
def bootstrap():
    server = BootstrapServer(1, port=0, auth=PlaneAuth(SECRET), refusals=Refusals()).start()
    yield server
    server.stop()


def rank_info(port: int) -> m.RankInfo:
    return m.RankInfo(0, HOST, port, LAYOUT, "tiny", "tcp", 1)


def test_bootstrap_hijack_without_the_secret_is_refused(bootstrap):
    import asyncio

    async def main():
        owner = BootstrapClient(HOST, bootstrap.port, PlaneAuth(SECRET))
        outsider = BootstrapClient(HOST, bootstrap.port, PlaneAuth("guess"))
        try:
            await owner.register_rank(rank_info(40000), time.monotonic() + 5)
            with pytest.raises(BootstrapError, match="401"):
                await outsider.register_rank(rank_info(6666), time.monotonic() + 5)
            with pytest.raises(BootstrapError, match="not signed"):  # answers are bound to the secret too
                await outsider.rank_info(0, time.monotonic() + 5)
            return await owner.rank_info(0, time.monotonic() + 5)
        finally:
            await owner.close()
            await outsider.close()

    raw = httpx.put(f"http://{HOST}:{bootstrap.port}/bootstrap/ranks/0", content=msgspec.json.encode(rank_info(6666)))
    assert raw.status_code == 401 and "X-PDServe-Auth" in raw.json()["error"]
    assert asyncio.run(main()).control_port == 40000
    for path in ("/bootstrap/rooms/5", "/bootstrap/ranks/0"):
        assert httpx.delete(f"http://{HOST}:{bootstrap.port}{path}").status_code in (401, 405)
    assert bootstrap.refusals.snapshot()["bootstrap:unauthenticated_write"] >= 2


# ---------------------------------------------------------------------- transfer connections


@pytest.fixture
def guarded_receiver():
    pool = filled_pool(1, "float32")
    events = Collector()
    guard = ReceiverGuard(PlaneAuth(SECRET), Refusals(), max_connections=16, handshake_timeout=0.5)
    receiver = create_receiver("tcp", pool, events, HOST, 5.0, guard=guard)
    yield receiver, events, guard, pool
    receiver.close()


def test_unauthenticated_stream_writes_nothing(guarded_receiver):
    receiver, events, guard, pool = guarded_receiver
    before = [layer.clone() for layer in pool.layers]
    receiver.open_room(3, [0, 1])
    nbytes = 2 * len(pool.layers) * pool.page_bytes()
    header = m.encode(m.Pages(3, [0, 1], nbytes))
    with socket.create_connection((HOST, receiver.port)) as s:
        s.settimeout(5)
        s.sendall(HEADER.pack(len(header)) + header + b"\xff" * nbytes + bytes(32))
        s.recv(64)  # the challenge
        assert _closed(s)
    done: list[SendResult] = []
    sender = create_sender("tcp", filled_pool(2, "float32"), done.append, 5.0, auth=PlaneAuth("wrong"))
    try:
        sender.send_pages(receiver.info(), 3, [4, 5], [0, 1])
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done and "refused our proof" in done[0].error
    finally:
        sender.close()
    time.sleep(0.2)
    assert events.events == [] and all(torch.equal(a, b) for a, b in zip(before, pool.layers))
    assert guard.refusals.snapshot()[f"KV receiver {receiver.port}:unauthenticated"] == 2


def test_idle_connections_and_oversized_frames_are_cut_at_the_caps(guarded_receiver):
    receiver, events, guard, _ = guarded_receiver
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(1000):
            socks.append(socket.create_connection((HOST, receiver.port)))
        peak = threading.active_count()
        assert peak - threads_before <= guard.max_connections + 2
        deadline = time.monotonic() + guard.handshake_timeout + 5
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            assert _closed(s), "an idle connection outlived the handshake timeout"
    finally:
        for s in socks:
            s.close()
    counts = guard.refusals.snapshot()
    assert counts[f"KV receiver {receiver.port}:connection_cap"] >= 1000 - guard.max_connections - 50
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(16):  # an authenticated peer announcing 60 MiB headers is cut before they are read
        with socket.create_connection((HOST, receiver.port)) as s:
            s.settimeout(5)
            challenge = s.recv(32)
            s.sendall(PlaneAuth(SECRET).respond(STREAM_PURPOSE, challenge))
            assert s.recv(1) == b"\x01"
            s.sendall(HEADER.pack(60 << 20) + b"x" * 65536)
            assert _closed(s)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 << 10  # KiB: far below 16 x 60 MiB
    assert guard.refusals.snapshot()[f"KV receiver {receiver.port}:oversized_frame"] == 16
    assert events.events == []


def _authenticate(s: socket.socket) -> None:
    challenge = s.recv(32)
    s.sendall(PlaneAuth(SECRET).respond(STREAM_PURPOSE, challenge))
    assert s.recv(1) == b"\x01"


def _wait_done(done: list[SendResult], n: int) -> list[SendResult]:
    deadline = time.monotonic() + 5
    while len(done) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) >= n, done
    return done[:n]


def test_idle_authenticated_connections_are_closed_and_senders_reconnect():
    """An authenticated peer that sends nothing holds the receiver's only slot until the idle bound
    (--disaggregation-idle-timeout) cuts it; a sender whose kept connection the receiver closed
    between rooms reconnects for the next room without failing it."""
    pool = filled_pool(1, "float32")
    events = Collector()
    idle = 0.5
    guard = ReceiverGuard(PlaneAuth(SECRET), Refusals(), max_connections=1, handshake_timeout=0.5, idle_timeout=idle)
    receiver = create_receiver("tcp", pool, events, HOST, 5.0, guard=guard)
    src = filled_pool(2, "float32")
    done: list[SendResult] = []
    # the sender thinks receivers allow 60 s, so only seeing the receiver's close makes it reconnect
    sender = create_sender("tcp", src, done.append, 5.0, auth=PlaneAuth(SECRET), idle_timeout=60.0)
    lost: list[object] = []
    sender.on_lost = lost.append  # an idle close is not a dead receiver: nothing bound to it may fail
    key = f"KV receiver {receiver.port}:idle_timeout"
    try:
        with socket.create_connection((HOST, receiver.port)) as squatter:
            squatter.settimeout(5)
            _authenticate(squatter)
            start = time.monotonic()
            receiver.open_room(1, [1])
            sender.send_pages(receiver.info(), 1, [4], [1])
            assert "connection cap" in (_wait_done(done, 1)[0].error or "")  # the squatter holds the slot
            assert _closed(squatter)
            assert idle * 0.8 < time.monotonic() - start < idle + 3
        assert guard.refusals.snapshot()[key] == 1
        for i, room in enumerate((1, 2)):
            receiver.open_room(room, [room])
            sender.send_pages(receiver.info(), room, [room + 3], [room])
            sender.send_message(receiver.info(), m.Status(room, True))
            assert all(r.error is None for r in _wait_done(done, 3 + 2 * i)[1:])
            events.wait_for(lambda ev, r=room: any(isinstance(e, m.Status) and e.room == r for e in ev), f"room {room}")
            assert all(torch.equal(dst[room], s[room + 3]) for dst, s in zip(pool.layers, src.layers))
            receiver.close_room(room)
            if room == 1:  # idle between rooms: the receiver closes the kept connection
                deadline = time.monotonic() + idle + 5
                while guard.refusals.snapshot()[key] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert guard.refusals.snapshot()[key] == 2
                time.sleep(0.5)  # the sender's liveness thread has seen the close
        assert all(not isinstance(e, PeerLost) for e in events.events)
        assert lost == []
    finally:
        sender.close()
        receiver.close()


def test_a_sender_reopens_a_connection_idle_half_the_receivers_bound():
    """The sender does not reuse a connection that carries no room and sat idle for half the idle
    bound: the receiver could be closing it at that moment, and a frame written into a closing
    connection is lost. Reopening it fails nothing: the rooms it carried had ended."""
    pool, src = filled_pool(1, "float32"), filled_pool(2, "float32")
    events = Collector()
    receiver = create_receiver("tcp", pool, events, HOST, 5.0, guard=ReceiverGuard(PlaneAuth(SECRET), Refusals()))
    done: list[SendResult] = []
    sender = create_sender("tcp", src, done.append, 5.0, auth=PlaneAuth(SECRET), idle_timeout=2.0)
    try:
        socks = []
        for i, room in enumerate((1, 2, 3)):
            receiver.open_room(room, [room])
            sender.send_pages(receiver.info(), room, [room + 3], [room])
            sender.send_message(receiver.info(), m.Status(room, True))
            assert all(r.error is None for r in _wait_done(done, 2 * i + 2))
            socks.append(sender._dests[receiver.info().address].sock)
            if room == 2:
                time.sleep(1.2)  # past half the bound (1 s), carrying no room
        assert socks[0] is socks[1] and socks[2] is not socks[1]
        assert all(torch.equal(d[r], s[r + 3]) for d, s in zip(pool.layers, src.layers) for r in (1, 2, 3))
        events.wait_for(lambda ev: sum(isinstance(e, m.Status) for e in ev) == 3, "three Status frames")
        time.sleep(0.2)  # the dropped connection's end has been read
        assert all(not isinstance(e, PeerLost) for e in events.events)
    finally:
        sender.close()
        receiver.close()


def test_a_connection_carrying_an_open_room_is_never_idle():
    """A room whose pages come long after its first frame (an ``Accepted`` sent when decode's KV
    request came, the prefill request queued behind others) keeps its connection on both ends: the
    sender does not drop it at half the idle bound and the receiver does not close it at the bound,
    so the room is not reported lost."""
    pool, src = filled_pool(1, "float32"), filled_pool(2, "float32")
    events = Collector()
    idle = 0.6
    guard = ReceiverGuard(PlaneAuth(SECRET), Refusals(), idle_timeout=idle)
    receiver = create_receiver("tcp", pool, events, HOST, 5.0, guard=guard)
    done: list[SendResult] = []
    sender = create_sender("tcp", src, done.append, 5.0, auth=PlaneAuth(SECRET), idle_timeout=idle)
    try:
        receiver.open_room(1, [1])
        sender.send_message(receiver.info(), m.Accepted(1, 0))
        _wait_done(done, 1)
        first = sender._dests[receiver.info().address].sock
        time.sleep(idle * 2)  # past both ends' bounds
        sender.send_pages(receiver.info(), 1, [4], [1])
        sender.send_message(receiver.info(), m.Status(1, True))
        assert all(r.error is None for r in _wait_done(done, 3))
        events.wait_for(lambda ev: any(isinstance(e, m.Status) for e in ev), "the room's Status")
        assert sender._dests[receiver.info().address].sock is first
        assert all(not isinstance(e, PeerLost) for e in events.events), events.events
        assert all(torch.equal(d[1], s[4]) for d, s in zip(pool.layers, src.layers))
        assert guard.refusals.snapshot().get(f"KV receiver {receiver.port}:idle_timeout", 0) == 0
    finally:
        sender.close()
        receiver.close()


def _closed(s: socket.socket) -> bool:
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ---------------------------------------------------------------------- shm segments


def test_shm_path_attack_writes_nothing(tmp_path):
    """A KV request can no longer name a file: it names (pid, fd, segment) and the segment must carry
    the deployment's proof. Any other file, even of the right size, is left untouched."""
    victim_pool = filled_pool(3, "float32")
    data_bytes = victim_pool.bytes_total()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"A" * (data_bytes + SHM_TRAILER_BYTES))
    fd = os.open(victim, os.O_RDWR)
    done: list[SendResult] = []
    sender = create_sender("shm", filled_pool(4, "float32"), done.append, 5.0, auth=PlaneAuth(SECRET))
    try:
        forged = m.ReceiverInfo("shm", HOST, 1, SHAPE["num_pages"], m.ShmSegment(os.getpid(), fd, "0" * 24))
        sender.send_pages(forged, 1, [0], [0])
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done and "not KV segment" in done[0].error
        # the old wire field is gone: a path in the message is ignored, not opened
        old_style = msgspec.json.encode({"backend": "shm", "host": HOST, "port": 1, "num_pages": 37,
                                         "shm_path": str(victim)})
        assert msgspec.json.decode(old_style, type=m.ReceiverInfo).shm is None
    finally:
        sender.close()
        os.close(fd)
    assert victim.read_bytes() == b"A" * (data_bytes + SHM_TRAILER_BYTES)


def test_shm_segment_needs_the_secret_of_its_creator():
    events = Collector()
    pool = filled_pool(5, "float32")
    receiver = create_receiver("shm", pool, events, HOST, 5.0, guard=ReceiverGuard(PlaneAuth(SECRET)))
    try:
        seg = receiver.info().shm
        assert seg is not None and seg.pid == os.getpid()
        with pytest.raises(ConnectionError, match="no proof"):
            open_segment(PlaneAuth("another deployment"), seg, pool.bytes_total())
        region = open_segment(PlaneAuth(SECRET), seg, pool.bytes_total())
        assert len(region) == pool.bytes_total() + SHM_TRAILER_BYTES
        region.close()
    finally:
        receiver.close()


def test_stream_header_limit_follows_the_pool():
    from pdserve.disagg.transfer.stream import max_header_bytes

    pages = list(range(10_000))
    header = m.encode(m.Pages(2**63 - 1, [2**32 - 1] * len(pages), 2**63 - 1))
    assert len(header) <= max_header_bytes(len(pages))
    tokens = 4 * 100  # a prompt filling a pool of 100 pages of 4, every input logprob with 20 alternatives
    worst = TokenLogprobs([2**32 - 1] * tokens, [-1e300] * tokens, [[(2**32 - 1, -1e300)] * 20] * tokens)
    first = TokenLogprobs([2**32 - 1], [-1e300], [[(2**32 - 1, -1e300)] * 20])
    header = m.encode(m.Aux(2**63 - 1, 2**32 - 1, first, 2**31, worst))
    assert len(header) <= max_header_bytes(100, 4)
    assert struct.calcsize("<I") == HEADER.size


def test_a_stuck_write_cut_by_close_room_says_goodbye(guarded_receiver, monkeypatch):
    """A receiver that cuts a connection under a closed room's stuck write is alive: it writes the
    goodbye byte before cutting, so the sender's liveness thread does not report it lost (which would
    fail every other room bound to that receiver)."""
    from pdserve.disagg.transfer import stream

    monkeypatch.setattr(stream, "CLOSE_WAIT_S", 0.3)
    receiver, events, guard, pool = guarded_receiver
    receiver.open_room(5, [0, 1])
    nbytes = 2 * len(pool.layers) * pool.page_bytes()
    header = m.encode(m.Pages(5, [0, 1], nbytes))
    with socket.create_connection((HOST, receiver.port)) as s:
        s.settimeout(5)
        _authenticate(s)
        s.sendall(HEADER.pack(len(header)) + header + b"\x00" * (nbytes // 2))  # half the payload, then silence
        time.sleep(0.3)  # the receiver is inside the write
        start = time.monotonic()
        receiver.close_room(5)
        assert time.monotonic() - start < 3
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(64):
                data += chunk
    assert data == stream.GOODBYE
    a, b = socket.socketpair()  # the sender side maps the byte to a deliberate close, an EOF to a loss
    with a, b:
        b.sendall(stream.GOODBYE)
        assert stream._ended(a) is stream.CLOSED_ON_PURPOSE
        b.close()
        a.recv(1)
        assert stream._ended(a) not in (None, stream.CLOSED_ON_PURPOSE)


def test_a_quiet_connection_with_a_timeout_is_not_taken_for_a_lost_one():
    """The soak's ``peer_lost``: the sender's liveness thread asks why a connection is readable, but
    the fd it polled may number a fresh connection by then (the old one dropped, the fd reused), which
    has nothing to read. On a socket with a timeout Python's ``recv`` waits that long even with
    ``MSG_DONTWAIT`` and then raises "timed out", which was reported as the receiver lost (its rooms
    failed, decode left waiting). A quiet connection must read as nothing wrong, at once."""
    from pdserve.disagg.transfer import stream

    a, b = socket.socketpair()
    with a, b:
        a.settimeout(2.0)  # as the sender's sockets have (the transfer timeout)
        start = time.monotonic()
        assert stream._ended(a) is None
        assert time.monotonic() - start < 0.5
