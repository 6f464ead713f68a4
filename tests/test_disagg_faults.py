"""P/D under faults with real ``pdserve serve`` processes: every failure whose outcome is known
fails within 2 s with an error naming the room, both ranks and the cause (issue 9, case 5), and a
SIGKILLed prefill or decode worker fails its paired half fast, is restarted, and the server serves
on its other rank meanwhile. Pools end with zero used pages.

The prefill server balances by load (``round_robin``), so decode resolves unpinned rooms through
their registration at the bootstrap service, which lets a decode half wait in that phase."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import time

import httpx
import pytest

from pdserve.router.config import WorkerSpec
from tests.router_harness import router_client, wait_for
from tests.server_harness import free_port, launch, wait_until

COMMON = ["--torch-threads", "1", "--page-size", "4", "--max-total-tokens", "2048", "--log-level", "warning",
          "--worker-restart-backoff", "0.2"]
# long waiting timeout: a failure that still takes it would show as a slow test, not a pass
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "20", "--disaggregation-waiting-timeout", "60",
               "--disaggregation-transfer-timeout", "5"]
FAST_S = 2.0
SHORT = {"max_new_tokens": 4, "min_new_tokens": 4, "temperature": 0}
PROMPT = "The history of the world in a few words"


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-fault-logs")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--load-balance-method", "round_robin",
                      "--disaggregation-bootstrap-port", str(bootstrap_port), *COMMON, *PD_TIMEOUTS], logs)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "2", *COMMON, *PD_TIMEOUTS], logs)
    try:
        for server in (prefill, decode):
            server.wait_healthy()
        yield {"prefill": prefill, "decode": decode, "bootstrap_port": bootstrap_port}
    finally:
        for server in (prefill, decode):
            server.stop()


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


def post(server, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, timeout=timeout)


def timed(server, body: dict) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = post(server, body)
    return resp, time.monotonic() - start


def half(pd, room: int, **extra) -> dict:
    return {"text": PROMPT, "sampling_params": SHORT, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": pd["bootstrap_port"], "bootstrap_room": room, **extra}


def error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]["message"]


def used_pages(server) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def assert_pages_freed(pd) -> None:
    for name in ("prefill", "decode"):
        assert wait_until(lambda n=name: used_pages(pd[n]) == 0, 10), f"{name} still holds KV pages"


def rank_load(server, rank: int) -> dict:
    return httpx.get(server.url + "/get_load", timeout=10).json()[rank]


def rank_state(server, rank: int) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["dp_ranks"][rank]


def test_pair_works(pd, pool):
    p = pool.submit(post, pd["prefill"], half(pd, 1001, data_parallel_rank=1))
    d = post(pd["decode"], half(pd, 1001, data_parallel_rank=0, disagg_prefill_dp_rank=1))
    assert d.status_code == 200 and p.result().status_code == 200, (d.text, p.result().text)
    assert d.json()["meta_info"]["prefill_dp_rank"] == 1


@pytest.mark.parametrize("prefill_first", [True, False])
def test_decode_asking_the_wrong_prefill_rank_fails_both_at_once(pd, pool, prefill_first):
    """Prefill runs the room on rank 0, decode asks rank 1: both answer 400 naming both ranks."""
    room = 2000 + prefill_first
    p_body, d_body = half(pd, room, data_parallel_rank=0), half(pd, room, data_parallel_rank=1, disagg_prefill_dp_rank=1)
    first, second = (("prefill", p_body), ("decode", d_body)) if prefill_first else (("decode", d_body), ("prefill", p_body))
    f = pool.submit(timed, pd[first[0]], first[1])
    time.sleep(0.5)  # the first half is waiting for the other
    s = pool.submit(timed, pd[second[0]], second[1])
    for resp, took in (f.result(), s.result()):
        message = error(resp, 400)
        assert f"prefill rank 0 holds bootstrap_room {room}; decode rank 1 asked prefill rank 1" in message
        assert took < FAST_S + (0.5 if resp is f.result()[0] else 0), took
    assert_pages_freed(pd)


def test_decode_refusal_reaches_prefill_at_once(pd, pool):
    """Decode refuses its half (no such decode rank): the prefill half, waiting or still to come,
    fails at once with decode's reason instead of holding its KV for the waiting timeout."""
    room = 3000
    waiting = pool.submit(timed, pd["prefill"], half(pd, room, data_parallel_rank=0))
    time.sleep(0.5)
    message = error(post(pd["decode"], half(pd, room, data_parallel_rank=7)), 400)
    assert "data_parallel_rank" in message
    resp, took = waiting.result()
    message = error(resp, 400)
    assert f"decode server refused the request for bootstrap_room {room} with HTTP 400" in message
    assert took < 0.5 + FAST_S
    # the prefill half arriving after the refusal fails at once too
    room = 3001
    error(post(pd["decode"], half(pd, room, data_parallel_rank=7)), 400)
    time.sleep(0.3)
    resp, took = timed(pd["prefill"], half(pd, room))
    assert f"bootstrap_room {room}" in error(resp, 400) and took < FAST_S
    assert_pages_freed(pd)


def test_decode_abort_while_resolving_reaches_prefill(pd, pool):
    """A decode half still waiting for its room's registration is aborted: prefill learns through
    its bootstrap service, and the late prefill half fails at once naming the abort."""
    room = 4000
    waiting = pool.submit(post, pd["decode"], half(pd, room, rid="resolving-4000"))
    assert wait_until(lambda: used_pages(pd["decode"]) > 0, 10)
    time.sleep(0.3)
    assert httpx.post(pd["decode"].url + "/abort_request", json={"rid": "resolving-4000"}).json()["aborted"] == 1
    assert waiting.result().status_code in (200, 503)
    time.sleep(0.3)
    resp, took = timed(pd["prefill"], half(pd, room))
    message = error(resp, 503)
    assert f"room {room}" in message and "aborted" in message and took < FAST_S
    assert_pages_freed(pd)


def test_streaming_client_leaving_before_its_kv_frees_decode_at_once(pd):
    """A streaming decode half whose prefill half never comes, and whose client then leaves: decode
    notices the disconnect while still waiting for the KV, frees its pages, and tells prefill, so
    the late prefill half fails at once (not after the 60 s waiting timeout)."""
    room = 4500
    body = json.dumps(half(pd, room, stream=True, disagg_prefill_dp_rank=0)).encode()
    host, port = pd["decode"].url.removeprefix("http://").split(":")
    # a raw socket: the response headers only come with the first token, which never comes
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: used_pages(pd["decode"]) > 0, 10)
    left = time.monotonic()
    assert wait_until(lambda: used_pages(pd["decode"]) == 0, 10)
    assert time.monotonic() - left < FAST_S + 1.0  # the disconnect poll is 0.5 s
    resp, took = timed(pd["prefill"], half(pd, room, data_parallel_rank=0))
    assert f"bootstrap_room {room}" in error(resp, 499) and took < FAST_S
    assert_pages_freed(pd)


@pytest.mark.parametrize("port", [0, -1, 65536, 2**64, "8998", 1.5])
def test_invalid_bootstrap_port_is_400(pd, port):
    resp = post(pd["decode"], half(pd, 5000, bootstrap_port=port, data_parallel_rank=0))
    assert resp.status_code == 400, resp.text
    assert "bootstrap_port" in resp.text


def test_closed_bootstrap_port_fails_fast(pd):
    port = free_port()
    resp, took = timed(pd["decode"], half(pd, 5001, bootstrap_port=port, data_parallel_rank=0))
    message = error(resp, 503)
    assert f"127.0.0.1:{port}" in message and "connection refused" in message and took < FAST_S, (took, message)
    assert_pages_freed(pd)


def test_prefill_rank_that_does_not_exist_is_400(pd):
    resp, took = timed(pd["decode"], half(pd, 5002, data_parallel_rank=0, disagg_prefill_dp_rank=5))
    message = error(resp, 400)
    assert "prefill rank 5 does not exist" in message and "room 5002" in message and took < FAST_S


def test_errors_say_whether_a_router_may_retry(pd):
    bad = post(pd["decode"], half(pd, 5003, data_parallel_rank=0, sampling_params={"temperature": -1}))
    assert bad.status_code == 400 and bad.headers["X-Pdserve-Retryable"] == "false"
    refused = post(pd["decode"], half(pd, 5004, bootstrap_port=free_port(), data_parallel_rank=0))
    assert refused.status_code == 503 and refused.headers["X-Pdserve-Retryable"] == "true"


def test_router_relays_request_caused_failures_without_retrying(pd):
    """A 400 from either half is the client's: one attempt, no retry, the server's message."""
    async def main():
        specs = [WorkerSpec(pd["prefill"].url, "prefill"), WorkerSpec(pd["decode"].url, "decode")]
        async with router_client(specs) as (client, state):
            resp = await client.post("/generate", json={"text": PROMPT, "sampling_params": {"top_p": 7}})
            assert resp.status_code == 400 and "top_p" in resp.text
            assert state.metrics.retries.labels("/generate")._value.get() == 0

    asyncio.run(main())


def test_duplicate_rid_through_the_router_leaves_the_owner_alone(pd, pool):
    """Case 7: a rid in flight (sent straight to the servers, or through the router) reused through
    the router is refused with 400, and the request owning it finishes untouched. No race with the
    engine's speed: the owner's decode half waits for KV that only its prefill half, sent after the
    duplicate was refused, brings; the router's own request generates 1,500 tokens."""
    owned_params = {"max_new_tokens": 96, "min_new_tokens": 96, "temperature": 0}
    long = {"max_new_tokens": 1500, "min_new_tokens": 1500, "temperature": 0}

    def prefill_idle() -> bool:
        return all(r["num_used_pages"] == 0 and r["num_reqs"] == 0
                   for r in httpx.get(pd["prefill"].url + "/get_load", timeout=10).json())

    async def main():
        specs = [WorkerSpec(pd["prefill"].url, "prefill"), WorkerSpec(pd["decode"].url, "decode")]
        async with router_client(specs) as (client, _):
            owner = pool.submit(post, pd["decode"], half(pd, 8000, rid="owned", sampling_params=owned_params,
                                                          data_parallel_rank=0, disagg_prefill_dp_rank=0))
            await asyncio.sleep(0.5)
            assert not owner.done(), owner.result().text  # waiting for its KV
            dup = await client.post("/generate", json={"text": PROMPT, "rid": "owned", "sampling_params": SHORT})
            assert dup.status_code == 400 and "owned" in dup.text, dup.text
            assert not owner.done(), owner.result().text
            # the duplicate's prefill half is failed by decode's refusal; then the owner's prefill half comes
            assert await asyncio.to_thread(wait_until, prefill_idle, 10)
            direct = await asyncio.to_thread(post, pd["prefill"], half(pd, 8000, rid="owned", data_parallel_rank=0))
            first = asyncio.create_task(client.post("/generate", json={
                "text": PROMPT, "rid": "mine", "sampling_params": long}))
            await asyncio.sleep(0.3)
            again = await client.post("/generate", json={"text": PROMPT, "rid": "mine", "sampling_params": SHORT})
            assert again.status_code == 400 and "mine" in again.text, again.text
            first = await first
            assert first.status_code == 200 and len(first.json()["output_ids"]) == 1500, first.text
            return direct, owner

    direct, owner = asyncio.run(main())
    assert direct.status_code == 200, direct.text
    assert owner.result().status_code == 200 and len(owner.result().json()["output_ids"]) == 96
    assert_pages_freed(pd)


def test_killed_prefill_worker(pd, pool):
    """SIGKILL prefill rank 1 while a room's prefill half waits there for its decode half (outside
    the engine: admission is gated by decode) and another room's KV request waits there for its
    prefill half: both fail fast naming the rank, prefill rank 0 keeps serving, rank 1 is restarted
    and serves again (decode re-resolves its new endpoint)."""
    prefill, decode = pd["prefill"], pd["decode"]
    held = pool.submit(timed, prefill, half(pd, 6000, data_parallel_rank=1))
    asked = pool.submit(timed, decode, half(pd, 6001, data_parallel_rank=0, disagg_prefill_dp_rank=1))
    assert wait_until(lambda: rank_load(prefill, 1)["num_waiting_reqs"] == 1 and used_pages(decode) > 0, 10)
    assert used_pages(prefill) == 0  # the waiting prefill half computed nothing
    time.sleep(0.5)  # decode's KV request reached prefill rank 1
    pid = rank_state(prefill, 1)["pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    resp, _ = held.result()
    assert f"DP rank 1 worker (pid {pid}) was killed by signal 9" in error(resp, 503)
    resp, _ = asked.result()
    message = error(resp, 503)
    assert "room 6001 (decode rank 0, prefill rank 1" in message
    assert "lost prefill rank 1" in message or "lost the KV transfer connection" in message
    assert time.monotonic() - killed_at < FAST_S + 1
    assert httpx.get(prefill.url + "/health").status_code == 200
    assert rank_state(prefill, 1)["state"] in ("restarting", "ready")
    # rank 0 serves meanwhile; a request pinned to rank 1 gets a retryable 503 naming it
    p = pool.submit(post, prefill, half(pd, 6002, data_parallel_rank=0))
    assert post(decode, half(pd, 6002, data_parallel_rank=1, disagg_prefill_dp_rank=0)).status_code == 200
    assert p.result().status_code == 200
    if rank_state(prefill, 1)["state"] != "ready":
        assert "DP rank 1 is restarting" in error(post(prefill, half(pd, 6003, data_parallel_rank=1)), 503)
    assert wait_until(lambda: rank_state(prefill, 1)["state"] == "ready", 90)
    assert rank_state(prefill, 1)["restarts"] == 1
    p = pool.submit(post, prefill, half(pd, 6004, data_parallel_rank=1))
    d = post(decode, half(pd, 6004, data_parallel_rank=0, disagg_prefill_dp_rank=1))
    assert d.status_code == 200 and p.result().status_code == 200, (d.text, p.result().text)
    assert_pages_freed(pd)


def test_killed_decode_worker(pd, pool):
    """SIGKILL decode rank 1 while its room's KV request waits at prefill: the decode request fails
    naming the rank, the late prefill half fails at once (decode's front told prefill), decode rank
    0 serves meanwhile, and rank 1 comes back."""
    prefill, decode = pd["prefill"], pd["decode"]
    waiting = pool.submit(timed, decode, half(pd, 7000, data_parallel_rank=1, disagg_prefill_dp_rank=0))
    assert wait_until(lambda: used_pages(decode) > 0, 10)
    time.sleep(0.5)
    pid = rank_state(decode, 1)["pid"]
    os.kill(pid, signal.SIGKILL)
    resp, _ = waiting.result()
    assert f"DP rank 1 worker (pid {pid}) was killed by signal 9" in error(resp, 503)
    time.sleep(0.3)
    resp, took = timed(prefill, half(pd, 7000, data_parallel_rank=0))
    assert "decode server refused the request for bootstrap_room 7000 with HTTP 503" in error(resp, 503)
    assert took < FAST_S
    assert httpx.get(decode.url + "/health").status_code == 200
    loads = httpx.get(decode.url + "/get_load").json()
    assert loads[1]["state"] in ("restarting", "ready") and loads[0]["state"] == "ready"
    p = pool.submit(post, prefill, half(pd, 7001, data_parallel_rank=1))
    assert post(decode, half(pd, 7001, data_parallel_rank=0, disagg_prefill_dp_rank=1)).status_code == 200
    assert p.result().status_code == 200
    assert wait_until(lambda: rank_state(decode, 1)["state"] == "ready", 90)
    p = pool.submit(post, prefill, half(pd, 7002, data_parallel_rank=0))
    assert post(decode, half(pd, 7002, data_parallel_rank=1, disagg_prefill_dp_rank=0)).status_code == 200
    assert p.result().status_code == 200
    assert_pages_freed(pd)


def test_router_keeps_serving_while_a_decode_rank_restarts(pd):
    """SIGKILL decode rank 1 under load through the router: the router takes unit decode#1 out of
    rotation (the server stays admitted), retries what the kill failed, serves every request on the
    live units, and takes the unit back once it is ready."""
    decode = pd["decode"]

    async def main():
        specs = [WorkerSpec(pd["prefill"].url, "prefill"), WorkerSpec(decode.url, "decode")]
        async with router_client(specs, decode_policy="round_robin") as (client, state):
            async def one(i: int) -> int:
                r = await client.post("/generate", json={"text": f"{PROMPT} {i}", "sampling_params": SHORT})
                return r.status_code

            assert await asyncio.gather(*(one(i) for i in range(4))) == [200] * 4
            pid = rank_state(decode, 1)["pid"]
            load = [asyncio.create_task(one(i)) for i in range(8)]
            await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            worker = state.fleet.workers[decode.url]
            assert await wait_for(lambda: not worker.units[1].up, 5), worker.describe()
            assert worker.healthy and len(state.fleet.units("decode")) == 1
            load += [asyncio.create_task(one(i)) for i in range(8, 20)]
            assert await asyncio.gather(*load) == [200] * 20
            assert await wait_for(lambda: worker.units[1].up, 90), worker.describe()
            assert len(state.fleet.units("decode")) == 2
            assert await asyncio.gather(*(one(i) for i in range(4))) == [200] * 4

    asyncio.run(main())
    assert_pages_freed(pd)
