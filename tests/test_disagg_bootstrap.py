"""Bootstrap service: registration, bounded long-polls (503 with a clear error, never 500), client deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import msgspec
import pytest

from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.bootstrap import AUTH_HEADER, BootstrapClient, BootstrapError, BootstrapServer
from pdserve.disagg.messages import BootstrapInfo, RankInfo, RoomRank
from pdserve.engine.kv_pool import KVLayout

LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=32, page_size=4, dtype="float32")


def rank_info(rank: int) -> RankInfo:
    return RankInfo(rank, "127.0.0.1", 40000 + rank, LAYOUT, "tiny", "tcp", 1)


@pytest.fixture
def service():
    server = BootstrapServer(2, port=0, load_balance_method="round_robin").start()
    yield server
    server.stop()


def signer(auth: PlaneAuth):
    """An httpx request hook sealing writes as the bootstrap client does."""

    def sign(request: httpx.Request) -> None:
        if request.method not in ("GET", "HEAD"):
            purpose = f"bootstrap {request.method} {request.url.path}".encode()
            request.headers[AUTH_HEADER] = auth.seal_header(purpose, request.read())

    return sign


@pytest.fixture
def http(service):
    hooks = {"request": [signer(service.auth)]}
    with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=10, event_hooks=hooks) as client:
        yield client


def test_lookup_before_registration_waits_then_succeeds(service, http):
    later = threading.Timer(0.3, lambda: http.put("/bootstrap/ranks/1", content=msgspec.json.encode(rank_info(1))))
    later.start()
    start = time.monotonic()
    resp = http.get("/bootstrap/ranks/1", params={"wait": 5})
    waited = time.monotonic() - start
    later.join()
    assert resp.status_code == 200, resp.text
    assert msgspec.json.decode(resp.content, type=RankInfo) == rank_info(1)
    assert 0.25 < waited < 3


def test_lookup_times_out_with_503_naming_what_was_awaited(service, http):
    start = time.monotonic()
    resp = http.get("/bootstrap/ranks/0", params={"wait": 0.3})
    assert 0.25 < time.monotonic() - start < 3
    assert resp.status_code == 503
    body = resp.json()
    assert "prefill rank 0 has not registered" in body["error"] and body["awaited"] == "registration of prefill rank 0"
    assert resp.headers["Retry-After"] == "1"
    assert http.get("/bootstrap/ranks/0").status_code == 503  # no wait: answers at once


def test_unknown_rank_is_404_and_bad_input_is_400(service, http):
    resp = http.get("/bootstrap/ranks/2", params={"wait": 5})
    assert resp.status_code == 404 and "dp_size 2" in resp.json()["error"]
    assert http.get("/bootstrap/ranks/x").status_code == 400
    assert http.get("/bootstrap/ranks/0", params={"wait": "soon"}).status_code == 400
    assert http.put("/bootstrap/ranks/0", content=b'{"rank": "zero"}').status_code == 400
    assert http.put("/bootstrap/ranks/5", content=msgspec.json.encode(rank_info(5))).status_code == 400
    assert http.put("/bootstrap/ranks/0", content=msgspec.json.encode(rank_info(1))).status_code == 400


def test_health_and_info(service, http):
    assert http.get("/health").status_code == 503
    for rank in (0, 1):
        assert http.put(f"/bootstrap/ranks/{rank}", content=msgspec.json.encode(rank_info(rank))).status_code == 200
    assert http.get("/health").status_code == 200
    info = msgspec.json.decode(http.get("/bootstrap/info").content, type=BootstrapInfo)
    assert info == BootstrapInfo(2, False, "round_robin", [0, 1], service.instance_id)
    assert len(service.instance_id) == 16


def test_mooncake_query_lists_registered_ranks(service, http):
    """vLLM's Mooncake bootstrap /query: {dp_rank: {engine_id, worker_addr}} of the registered ranks only."""
    assert http.get("/query").json() == {}
    assert http.put("/bootstrap/ranks/1", content=msgspec.json.encode(rank_info(1))).status_code == 200
    query = http.get("/query").json()
    assert list(query) == ["1"]
    assert query["1"]["engine_id"] == f"pdserve-{service.instance_id}-dp1"
    assert query["1"]["worker_addr"] == {"0": {"0": rank_info(1).control_endpoint}}


def test_room_registration_long_poll(service, http):
    room = 2**62 + 12345
    resp = http.get(f"/bootstrap/rooms/{room}", params={"wait": 0.2})
    assert resp.status_code == 503 and f"room {room}" in resp.json()["error"]
    threading.Timer(0.2, service.register_room, (room, 1)).start()
    resp = http.get(f"/bootstrap/rooms/{room}", params={"wait": 5})
    assert resp.status_code == 200 and msgspec.json.decode(resp.content, type=RoomRank) == RoomRank(room, 1)
    assert http.put(f"/bootstrap/rooms/{room}", content=msgspec.json.encode(RoomRank(room, 7))).status_code == 400
    assert http.delete(f"/bootstrap/rooms/{room}").status_code == 200
    assert http.get(f"/bootstrap/rooms/{room}").status_code == 503


def test_many_waiters_are_all_answered(service, http):
    """Concurrent long-polls for the same and different keys each get their own answer."""

    async def main():
        client = BootstrapClient("127.0.0.1", service.port)
        try:
            deadline = time.monotonic() + 5
            waits = [client.room_rank(room, deadline) for room in (1, 2, 2, 3)]
            later = asyncio.get_running_loop().call_later(
                0.2, lambda: [service.register_room(room, room % 2) for room in (1, 2, 3)]
            )
            result = await asyncio.gather(*waits)
            later.cancel()
            return result
        finally:
            await client.close()

    assert asyncio.run(main()) == [1, 0, 0, 1]


def test_client_deadline_gives_a_clear_error(service):
    async def main():
        client = BootstrapClient("127.0.0.1", service.port)
        try:
            with pytest.raises(BootstrapError) as err:
                await client.rank_info(1, time.monotonic() + 0.5)
            with pytest.raises(BootstrapError) as missing:
                await client.rank_info(9, time.monotonic() + 5)
            return err.value, missing.value
        finally:
            await client.close()

    start = time.monotonic()
    timeout, missing = asyncio.run(main())
    assert time.monotonic() - start < 3
    assert "timed out waiting for rank info of prefill rank 1" in str(timeout)
    assert f"127.0.0.1:{service.port}" in str(timeout) and "has not registered" in str(timeout)
    assert "does not exist" in str(missing) and missing.cause == "bootstrap_error"


def test_client_against_a_server_that_is_down():
    """Nothing listens: connection errors are retried until the deadline, then named."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def main():
        client = BootstrapClient("127.0.0.1", port)
        try:
            await client.info(time.monotonic() + 0.6)
        finally:
            await client.close()

    start = time.monotonic()
    with pytest.raises(BootstrapError) as err:
        asyncio.run(main())
    sock.close()
    assert time.monotonic() - start < 0.5  # nothing listens: waiting for the deadline cannot help
    assert f"bootstrap service at 127.0.0.1:{port}" in str(err.value)
    assert "connection refused" in str(err.value)


def test_port_in_use_is_reported():
    with BootstrapServer(1, port=0).start() as first, pytest.raises(OSError, match="bootstrap-port"):
        BootstrapServer(1, port=first.port).start()
