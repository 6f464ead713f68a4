"""A mixed server whose DP rank dies for good (``--worker-max-restarts 0``): the server stays
healthy on its other rank, ``/health`` and ``/get_load`` name the dead rank, requests pinned to it
get a retryable 503 naming it, unpinned ones are served by the live rank. (Restarts themselves are
covered with P/D servers in ``test_disagg_faults.py``.)"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.server_harness import launch, wait_until

ARGS = ["--torch-threads", "1", "--dp-size", "2", "--page-size", "4", "--max-total-tokens", "1024",
        "--log-level", "warning", "--worker-max-restarts", "0"]
BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = launch(ARGS, tmp_path_factory.mktemp("server-faults"))
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def test_a_rank_down_for_good_is_not_an_outage(server):
    ranks = httpx.get(server.url + "/health").json()["dp_ranks"]
    assert [r["state"] for r in ranks] == ["ready", "ready"]
    pid = ranks[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: httpx.get(server.url + "/health").json()["dp_ranks"][1]["state"] == "down", 10)
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert f"pid {pid}) was killed by signal 9" in health.json()["dp_ranks"][1]["error"]
    loads = httpx.get(server.url + "/get_load").json()
    assert [entry["state"] for entry in loads] == ["ready", "down"]
    pinned = httpx.post(server.url + "/generate", json={**BODY, "data_parallel_rank": 1}, timeout=30)
    assert pinned.status_code == 503 and pinned.headers["X-Pdserve-Retryable"] == "true"
    assert "DP rank 1 is down" in pinned.json()["error"]["message"]
    for _ in range(4):
        resp = httpx.post(server.url + "/generate", json=BODY, timeout=30)
        assert resp.status_code == 200, resp.text
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
    assert wait_until(lambda: httpx.get(server.url + "/get_load").json()[0]["num_used_pages"] == 0, 10)
