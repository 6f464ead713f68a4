"""The router's proxy mechanics against scripted aiohttp upstreams (tests/router_harness.py).

These check what the router itself does with HTTP: the fields it injects, chunk-by-chunk relay,
aborting the paired half, retries, client disconnects and health-based eviction. Correct model
output through the router is checked end to end with real servers in test_router_e2e.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from pdserve.router.config import WorkerSpec
from tests.router_harness import EchoUpstream, router_client, upstreams, wait_for


def pd_specs(prefills: list[EchoUpstream], decodes: list[EchoUpstream]) -> list[WorkerSpec]:
    return [WorkerSpec(p.url, "prefill") for p in prefills] + [WorkerSpec(d.url, "decode") for d in decodes]


async def _pair_fields() -> None:
    p = EchoUpstream(mode="prefill", dp_size=2, bootstrap_port=7001, input_logprobs=[[None, 5, None], [-9.0, 6, None]])
    d = EchoUpstream(mode="decode", dp_size=3, input_logprobs=[[None, 5, None], [-1.0, 6, None]])
    async with upstreams(p, d), router_client(pd_specs([p], [d])) as (c, _):
        for field in ("data_parallel_rank", "routed_dp_rank", "disagg_prefill_dp_rank", "prefill_data_parallel_rank"):
            r = await c.post("/generate", json={"text": "hello", field: 0})  # never silently replaced
            assert r.status_code == 400 and field in r.text and "--honor-client-ranks" in r.text, r.text
        r = await c.post("/generate", json={"text": "hello"}, headers={"X-Data-Parallel-Rank": "0"})
        assert r.status_code == 400 and "X-Data-Parallel-Rank" in r.text, r.text
        r = await c.post("/generate", json={"text": "hello", "return_logprob": True})
        assert r.status_code == 200, r.text
        pb, db = p.received[-1], d.received[-1]
        assert pb["bootstrap_room"] == db["bootstrap_room"] and 0 <= pb["bootstrap_room"] < 2**63
        assert pb["bootstrap_host"] == db["bootstrap_host"] == "127.0.0.1"
        assert pb["bootstrap_port"] == db["bootstrap_port"] == 7001  # from prefill's /server_info
        assert pb["rid"] == db["rid"] and pb["stream"] is False
        assert db["prefill_data_parallel_rank"] == db["disagg_prefill_dp_rank"] == pb["data_parallel_rank"]
        assert 0 <= db["data_parallel_rank"] < 3
        meta = r.json()["meta_info"]
        assert meta["input_token_logprobs"] == d.input_logprobs  # decode's answer, relayed whole (prefill's unread)
        assert meta["id"] == db["rid"]
        r = await c.post("/generate", json={"text": ["a", "b"], "rid": "mine"})
        rooms = d.received[-1]["bootstrap_room"]
        assert r.status_code == 200 and len(set(rooms)) == 2 and p.received[-1]["bootstrap_room"] == rooms
        assert d.received[-1]["rid"] == "mine"
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert "stream_options" not in p.received[-1] and d.received[-1]["stream_options"]


def test_pair_fields_and_decodes_whole_answer() -> None:
    asyncio.run(_pair_fields())


async def _configured_bootstrap_port() -> None:
    p = EchoUpstream(mode="prefill", bootstrap_port=7001)
    d = EchoUpstream(mode="decode")
    specs = [WorkerSpec(p.url, "prefill", 7555), WorkerSpec(d.url, "decode")]
    async with upstreams(p, d), router_client(specs) as (c, _):
        assert (await c.post("/generate", json={"text": "x"})).status_code == 200
        assert d.received[-1]["bootstrap_port"] == 7555


def test_configured_bootstrap_port_wins() -> None:
    asyncio.run(_configured_bootstrap_port())


async def _stream_relay() -> None:
    p = EchoUpstream(mode="prefill")
    d = EchoUpstream(mode="decode", chunks=4, chunk_delay_s=0.3)
    async with upstreams(p, d), router_client(pd_specs([p], [d])) as (c, _):
        received = b""
        arrived_at: dict[int, float] = {}  # chunk index -> when the client first held all of it
        async with c.stream("POST", "/generate", json={"text": "hi", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.aiter_raw():
                received += chunk
                now = time.perf_counter()
                for i in range(d.chunks):
                    if i not in arrived_at and f'"text": "{i}"'.encode() in received:
                        arrived_at[i] = now
        assert sorted(arrived_at) == list(range(d.chunks)) and received.endswith(b"data: [DONE]\n\n")
        # Relayed as they come: each chunk reaches the client before the upstream even writes the next
        # one (a router that buffered, or held chunks back, would deliver them together at the end).
        for i in range(d.chunks - 1):
            assert arrived_at[i] < d.chunk_sent_at[i + 1], (i, arrived_at, d.chunk_sent_at)


def test_stream_is_relayed_chunk_by_chunk() -> None:
    asyncio.run(_stream_relay())


async def _finished_stream_lets_prefill_answer() -> None:
    p = EchoUpstream(mode="prefill", delay_s=0.5)
    d = EchoUpstream(mode="decode")
    async with upstreams(p, d), router_client(pd_specs([p], [d])) as (c, state):
        r = await c.post("/generate", json={"text": "hi", "stream": True})
        assert r.status_code == 200 and p.active == 1
        assert await wait_for(lambda: p.active == 0 and not state.proxy.background)
        assert p.cancelled == 0 and p.aborted == [] and d.aborted == []


def test_finished_stream_lets_prefill_answer() -> None:
    asyncio.run(_finished_stream_lets_prefill_answer())


async def _prefill_error_aborts_decode() -> None:
    p = EchoUpstream(mode="prefill", fail_status=400)
    d = EchoUpstream(mode="decode", delay_s=30.0)
    async with upstreams(p, d), router_client(pd_specs([p], [d])) as (c, _):
        start = time.perf_counter()
        r = await c.post("/generate", json={"text": "hi", "rid": "r1"})
        assert r.status_code == 400 and "scripted 400" in r.text
        assert time.perf_counter() - start < 2.0
        assert len(p.received) == 1  # a 4xx is not retried
        # cancelled, but no abort by rid: a refused rid may belong to another request in flight
        assert await wait_for(lambda: d.active == 0 and d.cancelled == 1)
        assert d.aborted == []


def test_prefill_error_returns_promptly_and_cancels_decode() -> None:
    asyncio.run(_prefill_error_aborts_decode())


async def _decode_error_aborts_prefill_and_retries() -> None:
    p = EchoUpstream(mode="prefill", delay_s=0.5)
    bad = EchoUpstream(mode="decode", fail_status=500)
    good = EchoUpstream(mode="decode")
    async with upstreams(p, bad, good), router_client(pd_specs([p], [bad, good]),
                                                      decode_policy="round_robin") as (c, state):
        r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code == 200 and r.json()["text"] == f"from {good.port}"
        assert len(bad.received) == 1 and len(good.received) == 1  # the retry leaves the failed server out
        rooms = [b["bootstrap_room"] for b in p.received]
        assert len(set(rooms)) == len(rooms) == 2  # a fresh room per attempt
        assert await wait_for(lambda: len(p.aborted) == 1 and p.cancelled == 1)
        assert p.aborted[0] == bad.received[0]["rid"]
        metrics = state.metrics.render().decode()
        assert 'pdserve_router_retries_total{route="/generate"} 1.0' in metrics
        bad.fail_status = 503
        good.fail_status = 502
        r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code in (502, 503)  # every try failed: the last server error is relayed
        assert len(bad.received) + len(good.received) == 2 + 5


def test_decode_error_aborts_prefill_and_retries_on_a_fresh_pair() -> None:
    asyncio.run(_decode_error_aborts_prefill_and_retries())


async def _disconnect_mid_stream() -> None:
    p = EchoUpstream(mode="prefill", delay_s=5.0)  # prefill still pending when the client leaves
    d = EchoUpstream(mode="decode", chunks=50, chunk_delay_s=0.1)
    async with upstreams(p, d), router_client(pd_specs([p], [d])) as (c, state):
        async with c.stream("POST", "/generate", json={"text": "hi", "stream": True}) as r:
            async for _ in r.aiter_raw():
                break  # leave after the first chunk
        rid = d.received[0]["rid"]
        assert await wait_for(lambda: p.active == 0 and d.active == 0)
        assert p.cancelled == 1 and d.cancelled == 1
        assert await wait_for(lambda: p.aborted == [rid] and d.aborted == [rid])
        assert await wait_for(lambda: all(u.inflight_requests == 0 for w in state.fleet.workers.values()
                                          for u in w.units))
        # non-stream: the client gives up while both halves are pending
        d.delay_s = 5.0
        with_timeout = httpx.AsyncClient(base_url=c.base_url, timeout=0.5)
        try:
            await with_timeout.post("/generate", json={"text": "hi"})
        except httpx.TimeoutException:
            pass
        finally:
            await with_timeout.aclose()
        assert await wait_for(lambda: p.active == 0 and d.active == 0)
        assert p.cancelled == 2 and d.cancelled == 2
        assert not state.proxy.background or await wait_for(lambda: not state.proxy.background)


def test_client_disconnect_cancels_both_halves() -> None:
    asyncio.run(_disconnect_mid_stream())


async def _eviction_and_readmission() -> None:
    p = EchoUpstream(mode="prefill")
    d1 = EchoUpstream(mode="decode")
    d2 = EchoUpstream(mode="decode")
    async with upstreams(p, d1, d2), router_client(pd_specs([p], [d1, d2])) as (c, state):
        w1 = state.fleet.workers[d1.url]
        d1.healthy = False
        assert await wait_for(lambda: not w1.healthy)
        for _ in range(4):
            r = await c.post("/generate", json={"text": "hi"})
            assert r.status_code == 200 and r.json()["text"] == f"from {d2.port}"
        await d2.stop()  # refused connections: retried elsewhere, then evicted
        d1.healthy = True
        assert await wait_for(lambda: w1.healthy)
        for _ in range(3):
            r = await c.post("/generate", json={"text": "hi"})
            assert r.status_code == 200 and r.json()["text"] == f"from {d1.port}"
        assert await wait_for(lambda: not state.fleet.workers[d2.url].healthy)
        d1.healthy = False
        assert await wait_for(lambda: not w1.healthy)
        r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code == 503 and "no healthy decode worker" in r.text
        assert (await c.get("/health")).status_code == 503
        await d2.start(d2.port)  # back on its port: re-admitted
        assert await wait_for(lambda: state.fleet.workers[d2.url].healthy)
        assert (await c.post("/generate", json={"text": "hi"})).status_code == 200
        metrics = state.metrics.render().decode()
        assert "pdserve_router_worker_evictions_total" in metrics


def test_eviction_and_readmission() -> None:
    asyncio.run(_eviction_and_readmission())


async def _runtime_fleet_changes() -> None:
    p = EchoUpstream(mode="prefill")
    d = EchoUpstream(mode="decode", dp_size=2)
    mixed = EchoUpstream(mode="null")
    async with upstreams(p, d, mixed), router_client(pd_specs([p], []), ready=False) as (c, state):
        r = await c.post("/add_worker", params={"url": mixed.url, "type": "decode"})
        assert r.status_code == 400 and "disaggregation_mode='null'" in r.text
        r = await c.post("/add_worker", params={"url": d.url, "type": "decode"})
        assert r.status_code == 200 and r.json()["worker"]["dp_size"] == 2
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/generate", json={"text": "hi"})).status_code == 200
        listed = {w["url"]: w for w in (await c.get("/workers")).json()["workers"]}
        assert listed[d.url]["type"] == "decode" and listed[d.url]["healthy"]
        loads = (await c.get("/get_loads")).json()["units"]
        assert {(u["worker"], u["dp_rank"]) for u in loads} == {(p.url, 0), (d.url, 0), (d.url, 1)}
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "echo"
        assert (await c.post("/remove_worker", params={"url": d.url})).status_code == 200
        r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code == 503 and "decode" in r.text


def test_add_and_remove_workers_at_run_time() -> None:
    asyncio.run(_runtime_fleet_changes())


async def _mixed_mode() -> None:
    a = EchoUpstream(mode="null", dp_size=2, chunk_delay_s=0.05)
    b = EchoUpstream(mode="null", dp_size=1)
    specs = [WorkerSpec(a.url, "mixed"), WorkerSpec(b.url, "mixed")]
    async with upstreams(a, b), router_client(specs, prefill_policy="round_robin") as (c, state):
        for _ in range(6):
            assert (await c.post("/v1/completions", json={"prompt": "hi"})).status_code == 200
        ranks = sorted((body["data_parallel_rank"], s.port) for s in (a, b) for body in s.received)
        assert ranks == sorted([(0, a.port), (1, a.port), (0, b.port)] * 2)
        assert all("bootstrap_room" not in body for body in a.received)
        r = await c.post("/generate", json={"text": "hi", "stream": True})
        assert r.status_code == 200 and r.text.count("data: ") == 4
        b.fail_status = 500
        for _ in range(3):
            assert (await c.post("/generate", json={"text": "hi"})).status_code == 200


def test_mixed_mode_balances_units() -> None:
    asyncio.run(_mixed_mode())
