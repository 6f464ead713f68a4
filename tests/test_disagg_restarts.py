"""P/D across prefill restarts with real ``pdserve serve`` processes (issue 9): a prefill half
refused because its rank is restarting fails its decode half at once, whichever half comes first;
a prefill room bound to a decode server that is SIGKILLed (front and workers: nobody tells) fails
at once and frees its KV; and a whole prefill server that comes back with another DP size is
re-resolved by decode.

The prefill server restarts a dead rank only after 4 s (``--worker-restart-backoff``), so a test
has a window in which the rank is certainly ``restarting``; it holds page sends of at least 48
pages for 60 s (test hook), so a long prompt's KV sits computed and queued while short prompts
pass. Pools end with zero used pages."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import time

import pytest

from tests.server_harness import free_port, launch, wait_until
from tests.test_disagg_faults import (
    SHORT,
    assert_pages_freed,
    error,
    half,
    post,
    rank_state,
    timed,
    used_pages,
)

COMMON = ["--torch-threads", "1", "--page-size", "4", "--max-total-tokens", "1024", "--log-level", "warning"]
# long waiting timeout: a failure that still takes it would show as a slow test, not a pass
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "20", "--disaggregation-waiting-timeout", "60",
               "--disaggregation-transfer-timeout", "5"]
RESTART_BACKOFF_S = 4.0
FAST_S = 2.0
HELD_SEND = {"PDSERVE_TEST_KV_SEND_DELAY_S": "60", "PDSERVE_TEST_KV_SEND_DELAY_MIN_PAGES": "48"}


def prefill_args(dp_size: int, bootstrap_port: int) -> list[str]:
    return ["--disaggregation-mode", "prefill", "--dp-size", str(dp_size), "--disaggregation-bootstrap-port",
            str(bootstrap_port), "--worker-restart-backoff", str(RESTART_BACKOFF_S), *COMMON, *PD_TIMEOUTS]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-restart-logs")
    bootstrap_port = free_port()
    servers = {"prefill": launch(prefill_args(2, bootstrap_port), logs, env=HELD_SEND),
               "decode": launch(["--disaggregation-mode", "decode", "--dp-size", "1", *COMMON, *PD_TIMEOUTS], logs),
               "bootstrap_port": bootstrap_port, "logs": logs}
    try:
        for name in ("prefill", "decode"):
            servers[name].wait_healthy()
        yield servers
    finally:
        for name in ("prefill", "decode"):
            servers[name].stop()


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def test_refusal_for_a_restarting_prefill_rank_fails_decode_at_once(pd, pool):
    """Prefill rank 1 is restarting: a prefill half pinned to it is refused (503), and the decode
    half of that room fails at once naming the refusal — whether it came first (waiting for the
    rank's registration) or after — instead of waiting for the restart and then the waiting timeout."""
    prefill, decode = pd["prefill"], pd["decode"]
    pid = rank_state(prefill, 1)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: rank_state(prefill, 1)["state"] == "restarting", 5)
    killed_at = time.monotonic()
    # decode first: it waits for prefill rank 1 to register again
    room = 9001
    waiting = pool.submit(timed, decode, half(pd, room, disagg_prefill_dp_rank=1))
    time.sleep(0.5)
    message = error(post(prefill, half(pd, room, data_parallel_rank=1)), 503)
    assert "DP rank 1 is restarting" in message
    resp, took = waiting.result()
    message = error(resp, 503)
    assert f"room {room}" in message and "refused the request for bootstrap_room" in message, message
    assert "DP rank 1 is restarting" in message and took < 0.5 + FAST_S, (took, message)
    # prefill first: the refusal is waiting for decode's half
    room = 9002
    error(post(prefill, half(pd, room, data_parallel_rank=1)), 503)
    resp, took = timed(decode, half(pd, room, disagg_prefill_dp_rank=1))
    message = error(resp, 503)
    assert f"room {room}" in message and "DP rank 1 is restarting" in message and took < FAST_S, (took, message)
    assert time.monotonic() - killed_at < RESTART_BACKOFF_S, "the rank came back too early: nothing was tested"
    assert rank_state(prefill, 1)["state"] == "restarting"
    # once back, the rank serves a fresh room (the refusals are per room)
    assert wait_until(lambda: rank_state(prefill, 1)["state"] == "ready", 90)
    p = pool.submit(post, prefill, half(pd, 9003, data_parallel_rank=1))
    d = post(decode, half(pd, 9003, disagg_prefill_dp_rank=1))
    assert d.status_code == 200 and p.result().status_code == 200, (d.text, p.result().text)
    assert_pages_freed(pd)


def test_prefill_notices_a_killed_decode_server_at_once(pd, pool):
    """A 256-token prompt (64 pages: its send is held by the test hook) is computed on prefill rank 0
    and queued for the decode server it is paired with; that decode server is SIGKILLed whole, so no
    front tells prefill. Prefill's sender sees the connection end: the prefill half fails within
    2 s naming the room, both ranks and the cause, and its KV is freed."""
    prefill = pd["prefill"]
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "1", *COMMON, *PD_TIMEOUTS], pd["logs"])
    try:
        decode.wait_healthy()
        room = 9201
        ids = [random.Random(5).randrange(1, 2000) for _ in range(256)]
        body = {"input_ids": ids, "sampling_params": SHORT, "bootstrap_host": "127.0.0.1",
                "bootstrap_port": pd["bootstrap_port"], "bootstrap_room": room}
        held = pool.submit(timed, prefill, {**body, "data_parallel_rank": 0})
        pool.submit(post, decode, {**body, "disagg_prefill_dp_rank": 0})
        assert wait_until(lambda: used_pages(prefill) >= 64 and used_pages(decode) >= 64, 20)
        time.sleep(0.5)  # the KV request reached prefill, whose 64-page send now waits
        assert used_pages(prefill) >= 64
        os.killpg(decode.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        resp, _ = held.result()
        message = error(resp, 503)
        assert time.monotonic() - killed_at < FAST_S, message
        assert f"room {room} (prefill rank 0, decode rank 0): lost decode rank 0's KV receiver" in message, message
        assert wait_until(lambda: used_pages(prefill) == 0, FAST_S), "prefill still holds the dead room's KV"
    finally:
        decode.stop()
    assert wait_until(lambda: used_pages(prefill) == 0, 10)


def test_prefill_server_back_with_another_dp_size_is_re_resolved(pd, pool):
    """The whole prefill server (DP 2, rooms follow ``room % 2``) stops and comes back on the same
    ports with DP 1: decode drops its cached DP size and rank endpoints and pairs an odd room with
    prefill rank 0 (with the stale DP size it would ask rank 1, which no longer exists)."""
    prefill, decode = pd["prefill"], pd["decode"]
    room = 9101  # odd: prefill rank 1 while DP is 2
    p = pool.submit(post, prefill, half(pd, room))
    d = post(decode, half(pd, room))
    assert d.status_code == 200 and p.result().status_code == 200, (d.text, p.result().text)
    assert d.json()["meta_info"]["prefill_dp_rank"] == 1
    port = prefill.port
    prefill.stop()
    relaunched = launch(prefill_args(1, pd["bootstrap_port"]), pd["logs"], env=HELD_SEND, port=port)
    pd["prefill"] = relaunched  # the fixture stops this one
    relaunched.wait_healthy()
    room = 9103
    p = pool.submit(post, relaunched, half(pd, room))
    d = post(decode, half(pd, room))
    assert d.status_code == 200 and p.result().status_code == 200, (d.text, p.result().text)
    assert d.json()["meta_info"]["prefill_dp_rank"] == 0
    assert_pages_freed(pd)
