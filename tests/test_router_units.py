"""Router unit tests without servers: policies, pairing, flags, request parsing, bad input."""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from pdserve.router.config import RouterConfig, WorkerSpec, add_arguments, router_config_from_args
from pdserve.router.fleet import Fleet
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import NoWorkers, Pairing
from pdserve.router.policies import POLICY_CLASSES, make_policy
from pdserve.router.policies.cache_aware import CacheAwarePolicy
from pdserve.router.prefix_index import CacheIndex, UnitCache, block_hashes
from pdserve.router.request_info import RequestInfo, request_info
from pdserve.router.worker import Unit, Worker
from tests.router_harness import fast_config, running_router


def units_of(url: str, dp_size: int, role: str = "prefill") -> list[Unit]:
    worker = Worker(url, role)
    worker.set_info({"dp_size": dp_size})
    return worker.units


def info(key: str = "hello", tokens: int = 10) -> RequestInfo:
    return RequestInfo(key, tokens, 16, None)


# ---------------------------------------------------------------------- policies
@pytest.mark.parametrize("name", sorted(POLICY_CLASSES))
def test_every_policy_picks_a_given_unit(name: str) -> None:
    policy = make_policy(name, RouterConfig())
    units = units_of("http://a:1", 2) + units_of("http://b:1", 3)
    for i in range(50):
        assert policy.select(units, info(f"prompt {i}")) in units
    assert policy.select(units[:1], info()) is units[0]


def test_round_robin_cycles() -> None:
    units = units_of("http://a:1", 3)
    policy = make_policy("round_robin", RouterConfig())
    assert [policy.select(units, info()).rank for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_random_covers_all_units() -> None:
    units = units_of("http://a:1", 4)
    policy = POLICY_CLASSES["random"](random.Random(0))
    assert {policy.select(units, info()).rank for _ in range(200)} == {0, 1, 2, 3}


def test_least_load_follows_router_inflight_tokens() -> None:
    units = units_of("http://a:1", 3)
    policy = make_policy("least_load", RouterConfig())
    units[0].begin(100)
    units[1].begin(50)
    assert policy.select(units, info()) is units[2]
    picks = Counter()
    for _ in range(30):  # each pick adds load where it went: the picks spread
        u = policy.select(units, info())
        u.begin(20)
        picks[u.rank] += 1
    assert set(picks) == {0, 1, 2}


def test_least_load_breaks_ties_at_random() -> None:
    units = units_of("http://a:1", 4)
    policy = POLICY_CLASSES["least_load"](random.Random(1))
    assert len({policy.select(units, info()).rank for _ in range(100)}) == 4


def test_load_is_corrected_by_reports() -> None:
    unit = units_of("http://a:1", 1)[0]
    unit.begin(100)
    assert unit.load == 100
    unit.report({"dp_rank": 0, "num_tokens": 30})  # fewer than the router's estimate: its own count stands
    assert unit.load == 100
    unit.report({"dp_rank": 0, "num_tokens": 250})  # 150 tokens the router did not send
    assert unit.load == 250
    unit.end(100)
    assert unit.load == 150
    unit.report({"dp_rank": 0, "num_tokens": 7})
    assert unit.load == 7


def test_power_of_two_never_picks_the_most_loaded_of_many() -> None:
    units = units_of("http://a:1", 3)
    units[0].begin(1000)
    policy = POLICY_CLASSES["power_of_two"](random.Random(2))
    picks = {policy.select(units, info()).rank for _ in range(100)}
    assert 0 not in picks and picks == {1, 2}


def test_prefix_blocks_match_and_evict() -> None:
    hashes, block = block_hashes("a" * 16 + "b" * 16 + "c" * 5, 16)
    assert block == 16 and len(hashes) == 2
    tree = UnitCache(capacity=3)
    tree.predict(hashes, float("inf"))
    assert tree.match(hashes, 0.0) == 2
    other, _ = block_hashes("a" * 16 + "x" * 16, 16)
    assert tree.match(other, 0.0) == 1
    tree.predict(block_hashes("z" * 64, 16)[0], float("inf"))  # 4 new blocks: the oldest go
    assert len(tree) == 3 and tree.match(hashes, 0.0) == 0
    ids, id_block = block_hashes(tuple(range(10)), 16)
    assert id_block == 4 and len(ids) == 2


def test_cache_aware_keeps_a_prefix_on_its_unit() -> None:
    units = units_of("http://a:1", 2) + units_of("http://b:1", 2)
    policy = CacheAwarePolicy(CacheIndex(block_chars=8), threshold=0.3, abs_threshold=1000, rng=random.Random(3))
    system = "You are a helpful assistant. Answer briefly. " * 3
    first = policy.select(units, info(system + "question one"))
    for q in ("two", "three", "four"):
        assert policy.select(units, info(system + "question " + q)) is first
    others = {policy.select(units, info(f"{i} unrelated prompt number {i} " * 4)) for i in range(40)}
    assert len(others) > 1  # no match: goes by load and ties, not to one unit


def test_cache_aware_matches_token_prompts_by_the_servers_page_hashes() -> None:
    """Token-id prompts hash per KV page of each server (the engine's page hashes): a repeated
    prefix goes to the unit that holds its pages; under a page of shared tokens matches nothing."""
    from pdserve.kv_events import page_hashes

    units = []
    for url in ("http://a:1", "http://b:1"):
        worker = Worker(url, "prefill")
        worker.set_info({"dp_size": 2, "page_size": 16})
        units += worker.units
    policy = CacheAwarePolicy(threshold=0.3, abs_threshold=10_000, rng=random.Random(1))
    system = tuple(range(100, 164))  # four pages
    first = policy.select(units, RequestInfo(system + (1, 2, 3), 67, 16, None))
    assert policy.index.match(first, page_hashes(system, 16)) == 4
    for tail in range(5):
        assert policy.select(units, RequestInfo(system + (tail,) * 9, 73, 16, None)) is first
    picks = {policy.select(units, RequestInfo(tuple(range(i * 50, i * 50 + 40)), 40, 16, None)) for i in range(12)}
    assert len(picks) > 1


def test_cache_aware_balances_when_imbalanced() -> None:
    units = units_of("http://a:1", 2)
    policy = CacheAwarePolicy(CacheIndex(block_chars=8), threshold=0.3, abs_threshold=64, rel_threshold=1.5)
    prompt = "shared prefix of a long prompt " * 4
    first = policy.select(units, info(prompt))
    first.begin(1000)  # its unit is now far more loaded
    assert policy.select(units, info(prompt)) is not first
    policy.forget(first)
    assert first not in policy.index.units


# ---------------------------------------------------------------------- pairing
def fleet_with(prefill: list[int], decode: list[int]) -> Fleet:
    workers = [WorkerSpec(f"http://127.0.0.1:{9000 + i}", "prefill") for i in range(len(prefill))]
    workers += [WorkerSpec(f"http://127.0.0.1:{9100 + i}", "decode") for i in range(len(decode))]
    fleet = Fleet(RouterConfig(pd_disaggregation=True, workers=workers), RouterMetrics())
    sizes = prefill + decode
    for worker, dp in zip(fleet.workers.values(), sizes):
        worker.set_info({"dp_size": dp})
        worker.healthy = True
    fleet._rebuild()
    return fleet


def test_decoupled_pairs_cover_all_rank_combinations() -> None:
    fleet = fleet_with([2, 2], [3])
    pairing = Pairing(fleet, make_policy("random", RouterConfig()), make_policy("random", RouterConfig()))
    pairs = {(p.rank, d.rank) for p, d in (pairing.pick_pair(info()) for _ in range(300))}
    assert pairs == {(i, j) for i in range(2) for j in range(3)}


def test_dp_coupled_pairs_rank_r_with_r_mod_prefill_dp() -> None:
    fleet = fleet_with([2, 2], [3])
    pairing = Pairing(fleet, make_policy("random", RouterConfig()), make_policy("random", RouterConfig()),
                      dp_coupled=True)
    pairs = {(p.rank, d.rank) for p, d in (pairing.pick_pair(info()) for _ in range(300))}
    assert pairs == {(0, 0), (1, 1), (0, 2)}
    equal = Pairing(fleet_with([3], [3]), make_policy("round_robin", RouterConfig()),
                    make_policy("round_robin", RouterConfig()), dp_coupled=True)
    assert all(p.rank == d.rank for p, d in (equal.pick_pair(info()) for _ in range(30)))


def test_pairing_excludes_failed_workers_and_names_empty_side() -> None:
    fleet = fleet_with([1, 1], [1])
    pairing = Pairing(fleet, make_policy("round_robin", RouterConfig()), make_policy("round_robin", RouterConfig()))
    first = fleet.units("prefill")[0].worker
    assert all(pairing.pick_pair(info(), {first})[0].worker is not first for _ in range(5))
    only_decode = fleet.units("decode")[0].worker
    assert pairing.pick_pair(info(), {only_decode})[1].worker is only_decode  # nothing else left
    with pytest.raises(NoWorkers, match="no healthy prefill worker"):
        Pairing(fleet_with([], [1]), pairing.prefill_policy, pairing.decode_policy).pick_pair(info())


# ---------------------------------------------------------------------- flags and bodies
def parse(argv: list[str]) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = router_config_from_args(parser.parse_args(argv))
    config.validate()
    return config


def test_flags_follow_sglang_router() -> None:
    c = parse(["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "8998", "--prefill", "http://127.0.0.1:2",
               "none", "--prefill", "http://127.0.0.1:3/", "--decode", "http://127.0.0.1:4",
               "--policy", "power_of_two", "--decode-policy", "round_robin", "--disable-retries"])
    assert [(w.url, w.role, w.bootstrap_port) for w in c.workers] == [
        ("http://127.0.0.1:1", "prefill", 8998), ("http://127.0.0.1:2", "prefill", None),
        ("http://127.0.0.1:3", "prefill", None), ("http://127.0.0.1:4", "decode", None)]
    assert (c.prefill_policy, c.decode_policy, c.retry_max_retries) == ("power_of_two", "round_robin", 1)
    mixed = parse(["--worker-urls", "http://127.0.0.1:5", "http://127.0.0.1:6"])
    assert [w.role for w in mixed.workers] == ["mixed", "mixed"] and not mixed.pd_disaggregation


@pytest.mark.parametrize("argv, message", [
    (["--prefill", "http://127.0.0.1:1"], "need --pd-disaggregation"),
    (["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "abc"], "integer or 'none'"),
    (["--pd-disaggregation", "--prefill", "127.0.0.1:1"], "http://HOST:PORT"),
    (["--pd-disaggregation", "--decode", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:1"], "twice"),
    (["--pd-disaggregation", "--worker-urls", "http://127.0.0.1:1"], "cannot be combined"),
])
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_request_info_reads_every_route() -> None:
    g = request_info("/generate", {"text": "x" * 40, "sampling_params": {"max_new_tokens": 8}})
    assert (g.key, g.prompt_tokens, g.max_new_tokens, g.batch_size) == ("x" * 40, 11, 8, None)
    ids = request_info("/generate", {"input_ids": [1, 2, 3]})
    assert ids.key == (1, 2, 3) and ids.prompt_tokens == 3 and ids.max_new_tokens == 128
    batch = request_info("/generate", {"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 2}})
    assert batch.batch_size == 3 and batch.max_new_tokens == 6
    assert request_info("/generate", {"input_ids": [[1], [2, 3]]}).batch_size == 2
    chat = request_info("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert chat.key == "user:hi\n" and chat.max_new_tokens == 5
    comp = request_info("/v1/completions", {"prompt": "abc", "max_tokens": 3})
    assert comp.key == "abc" and comp.decode_tokens == comp.prompt_tokens + 3
    junk = request_info("/generate", {"text": 5, "sampling_params": "x"})
    assert junk.key == "" and junk.prompt_tokens == 1


# ---------------------------------------------------------------------- bad input, no servers
DOWN = [WorkerSpec("http://127.0.0.1:9", "prefill"), WorkerSpec("http://127.0.0.1:10", "decode")]


async def _bad_input() -> None:
    config = fast_config(DOWN, max_payload_size=1000)
    async with running_router(config, ready=False) as (url, _state), httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/nope")
        assert r.status_code == 404 and "no route /nope" in r.json()["error"]["message"]
        r = await c.get("/generate")
        assert r.status_code == 405
        for content, message in [(b"{bad", "invalid JSON"), (b"[1, 2]", "JSON object"), (b"", "empty"),
                                 (b'{"text": "a", "stream": "yes"}', "stream must be a boolean")]:
            r = await c.post("/generate", content=content)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        r = await c.post("/v1/completions", content=b"{bad")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post("/generate", json={"text": "x" * 2000})
        assert r.status_code == 413
        r = await c.post("/generate", json={"text": "hello"})
        assert r.status_code == 503 and "no healthy prefill worker" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        r = await c.get("/health")
        assert r.status_code == 503 and "prefill" in r.json()["error"]["message"]
        assert (await c.get("/liveness")).status_code == 200
        assert (await c.get("/v1/models")).json() == {"object": "list", "data": []}
        workers = (await c.get("/workers")).json()["workers"]
        assert [w["healthy"] for w in workers] == [False, False] and workers[0]["last_error"]
        r = await c.post("/add_worker", params={"url": "http://127.0.0.1:11", "type": "mixed"})
        assert r.status_code == 400 and "prefill or decode" in r.text
        r = await c.post("/add_worker", params={"url": "not a url", "type": "decode"})
        assert r.status_code == 400
        r = await c.post("/add_worker", params={"url": "http://127.0.0.1:9", "type": "prefill"})
        assert r.status_code == 409
        r = await c.post("/add_worker", params={"url": "http://127.0.0.1:12", "type": "decode",
                                                "bootstrap_port": "5"})
        assert r.status_code == 400 and "prefill workers only" in r.text
        r = await c.post("/add_worker", params={"url": "http://127.0.0.1:12", "type": "decode"})
        assert r.status_code == 202 and r.json()["status"] == "pending"
        assert (await c.post("/remove_worker", params={"url": "http://127.0.0.1:12"})).status_code == 200
        assert (await c.post("/remove_worker", params={"url": "http://127.0.0.1:12"})).status_code == 404
        metrics = (await c.get("/metrics")).text
        assert 'pdserve_router_requests_total{route="/generate",status="503"}' in metrics


def test_bad_input_without_servers() -> None:
    asyncio.run(_bad_input())


async def _api_key() -> None:
    config = fast_config(DOWN, api_key="sekret")
    async with running_router(config, ready=False) as (url, _state), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/generate", json={"text": "hi"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/health")).status_code == 503  # open path
        assert (await c.get("/metrics")).status_code == 200
        r = await c.post("/generate", json={"text": "hi"}, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 503


def test_api_key() -> None:
    asyncio.run(_api_key())


def test_router_depends_on_the_servers_over_http_only() -> None:
    code = (
        "import sys, pdserve.router.app, pdserve.router.cli, pdserve.router.launch\n"
        # the one shared piece: the torch-free HF tokenizer wrapper (cache-aware routing tokenizes prompts)
        "allowed = {'pdserve.models', 'pdserve.models.tokenizer'}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m not in allowed"
        " and m.startswith(('pdserve.engine', 'pdserve.server', 'pdserve.disagg', 'pdserve.models'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_upstream_answer_over_the_cap_is_a_named_failure_not_retried():
    """An upstream whose answer outgrows the cap is cut (connection closed) with a named error; the
    router does not try it on another pair, which would answer the same."""
    import asyncio

    from pdserve.router.http_client import ClientPool, Target, UpstreamError
    from pdserve.router.upstream import _failure

    async def run() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10240\r\n\r\n" + b"x" * 10240)
            await writer.drain()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ClientPool()
        try:
            conn = await pool.request(Target.parse(f"http://127.0.0.1:{port}/generate"), b"{}", {}, 5.0)
            try:
                await conn.read_all(limit=1024)
                raise AssertionError("an answer over the cap was read whole")
            except UpstreamError as e:
                assert e.reason == "oversized" and "1024 bytes" in str(e)
                assert conn.closed
                reply = _failure(e)
                assert reply.status == 0 and not reply.retryable
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())
