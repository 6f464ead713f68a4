"""P/D under load with real ``pdserve serve`` processes and short bounds (issue 21): a prefill rank
whose backlog lasts several times the transfer connections' idle bound still serves every room it
accepted, and a short soak — a few hundred pairs at concurrency 48 over random rank pairs, small
KV pools, 10 % aborted by their clients — loses no room to its connection (zero ``peer_lost`` /
``transfer_error``), answers every pair not aborted whole, and ends with clean pools.

Both servers run DP 2 with ``--disaggregation-idle-timeout 0.5``; prefill admits at most two
running requests per rank, so two long local generations pinned to one rank make a backlog there."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from pdserve.bench.pd_soak import LOST_CAUSES, SoakConfig, failure_counts, server_flags, soak
from tests.server_harness import free_port, launch

IDLE_S = 0.5
COMMON = ["--torch-threads", "1", "--dp-size", "2", "--log-level", "warning",
          *server_flags(idle_timeout=IDLE_S, waiting_timeout=20)]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-soak-logs")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap_port),
                      "--max-total-tokens", "4096", "--max-running-requests", "2", *COMMON], logs)
    decode = launch(["--disaggregation-mode", "decode", "--max-total-tokens", "1024", *COMMON], logs)
    try:
        for server in (prefill, decode):
            server.wait_healthy()
        yield {"prefill": prefill, "decode": decode, "bootstrap_port": bootstrap_port}
    finally:
        for server in (prefill, decode):
            server.stop()


def lost_rooms(pd) -> dict[str, int]:
    lost = {}
    for name in ("prefill", "decode"):
        counts = failure_counts(httpx.get(pd[name].url + "/metrics", timeout=10).text)
        lost.update({f"{name}:{cause}": counts[cause] for cause in LOST_CAUSES if counts.get(cause)})
    return lost


def test_a_prefill_backlog_longer_than_the_idle_bound_serves_every_room(pd):
    """Two 1500-token local generations fill prefill rank 0's running slots; six P/D pairs pinned to
    that rank are accepted at once (their KV requests come, decode's pages are reserved) and queue
    behind them for several idle bounds. Their transfer connections carry rooms, so neither end
    drops them as idle: every pair answers 200 with decode's output whole."""
    prefill, decode = pd["prefill"], pd["decode"]
    params = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
    local = {"input_ids": [11, 12, 13], "data_parallel_rank": 0,
             "sampling_params": {"max_new_tokens": 1500, "min_new_tokens": 1500, "temperature": 0}}

    def pair(i: int) -> tuple[httpx.Response, httpx.Response]:
        body = {"input_ids": [20 + i, *range(30, 60)], "sampling_params": params, "bootstrap_host": "127.0.0.1",
                "bootstrap_port": pd["bootstrap_port"], "bootstrap_room": 21_000 + i}
        with concurrent.futures.ThreadPoolExecutor(2) as two:
            p = two.submit(httpx.post, prefill.url + "/generate", json={**body, "data_parallel_rank": 0}, timeout=60)
            d = two.submit(httpx.post, decode.url + "/generate",
                           json={**body, "disagg_prefill_dp_rank": 0, "data_parallel_rank": i % 2}, timeout=60)
            return p.result(), d.result()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        backlog = [pool.submit(httpx.post, prefill.url + "/generate", json=local, timeout=60) for _ in range(2)]
        time.sleep(0.3)  # the local generations hold rank 0's two slots
        pairs = [pool.submit(pair, i) for i in range(6)]
        answers = [f.result() for f in pairs]
        assert all(f.result().status_code == 200 for f in backlog)
    waits = []
    for p, d in answers:
        assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
        assert len(d.json()["output_ids"]) == 8 and d.json()["output_ids"][:1] == p.json()["output_ids"]
        waits.append(d.json()["meta_info"]["kv_wait_ms"])
    assert min(waits) > 2 * IDLE_S * 1000, f"no backlog longer than the idle bound was made: {waits}"
    assert not lost_rooms(pd)


def test_short_soak_loses_no_room(pd):
    """300 pairs at concurrency 48, random rank pairs, 10 % aborted: zero rooms lost to their
    connection, every pair not aborted answered whole, no aborted pair's other half hangs, pools clean."""
    cfg = SoakConfig(pd["prefill"].url, pd["decode"].url, pd["bootstrap_port"], prefill_dp=2, decode_dp=2,
                     requests=300, concurrency=48, abort_fraction=0.10, max_new_tokens=16, seed=21,
                     request_timeout_s=30)
    result = asyncio.run(soak(cfg))
    summary = result.as_dict()
    assert not result.lost, summary
    assert not result.failed and not result.hung, summary
    # a client connection that broke under a half (seen twice in a 2000-pair run, unexplained yet; the
    # pair's other half is answered) is tolerated here up to 1 %, never a failure a server named
    assert len(result.transport_errors) <= cfg.requests // 100, summary
    assert result.aborted >= 15, summary
    assert result.answered + len(result.transport_errors) == result.requests - result.aborted, summary
    assert result.pools_clean, summary
    assert result.peak_page_use["decode"] > 0.5, f"no KV pressure on decode: {summary}"
