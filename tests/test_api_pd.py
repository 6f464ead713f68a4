"""Parallel sampling, structured output and tool calls through the router in front of a P/D pair
(real ``pdserve serve`` processes, the router in-process, the ``openai`` package as the client)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from pdserve.router.config import WorkerSpec
from tests.router_harness import router_client
from tests.server_harness import wait_until
from tests.test_api_features import SCHEMA, WEATHER_TOOL
from tests.test_router_e2e import decode_args, prefill_args, serve


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("api-pd")
    servers = [serve(prefill_args(1), log_dir, "prefill"), serve(decode_args(1), log_dir, "decode")]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop()


def idle(servers) -> bool:
    return all(sum(r["num_used_pages"] for r in httpx.get(s.url + "/get_load", timeout=10).json()) == 0
               for s in servers)


def through_router(pair, scenario) -> None:
    specs = [WorkerSpec(pair[0].url, "prefill"), WorkerSpec(pair[1].url, "decode")]

    async def run() -> None:
        async with router_client(specs) as (c, _):
            oai = openai.AsyncOpenAI(base_url=str(c.base_url) + "/v1", api_key="none", max_retries=0, timeout=120)
            await scenario(c, oai)

    asyncio.run(run())
    assert wait_until(lambda: idle(pair), 20)


def test_n_seeded_through_router_pd(pair):
    async def scenario(c, oai) -> None:
        model = (await oai.models.list()).data[0].id
        kwargs = dict(model=model, prompt="Once upon a time", max_tokens=10, n=3, seed=21, temperature=1.0)
        first = await oai.completions.create(**kwargs)
        again = await oai.completions.create(**kwargs)
        texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
        assert len(set(texts)) == 3 and texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
        assert first.usage.completion_tokens == 30
        stream = await oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, n=3, seed=21, stream=True)
        streamed: dict[int, str] = {}
        async for chunk in stream:
            for ch in chunk.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
        chat = await oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, n=3, seed=21)
        assert [streamed[i] for i in range(3)] == [ch.message.content for ch in chat.choices]
        assert len(set(streamed.values())) == 3

    through_router(pair, scenario)


def test_structured_output_and_tools_through_router_pd(pair):
    async def scenario(c, oai) -> None:
        model = (await oai.models.list()).data[0].id
        for seed in (1, 2):
            r = await oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "a person"}], max_tokens=200, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        r = await c.post("/generate", json={"text": "Hi", "sampling_params": {
            "max_new_tokens": 30, "temperature": 1.0, "regex": "[0-9]{2}:[0-9]{2}"}})
        assert r.status_code == 200, r.text
        text = r.json()["text"]
        assert len(text) == 5 and text[2] == ":" and text.replace(":", "").isdigit(), text
        r = await oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
            tool_choice="required", max_tokens=200, seed=5)
        call = r.choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])

    through_router(pair, scenario)


def test_honor_client_ranks(pair):
    specs = [WorkerSpec(pair[0].url, "prefill"), WorkerSpec(pair[1].url, "decode")]
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}

    async def run() -> None:
        async with router_client(specs, honor_client_ranks=True) as (c, _):
            r = await c.post("/generate", json={**body, "data_parallel_rank": 0, "disagg_prefill_dp_rank": 0})
            assert r.status_code == 200, r.text
            meta = r.json()["meta_info"]
            assert (meta["prefill_dp_rank"], meta["decode_dp_rank"]) == (0, 0)
            r = await c.post("/generate", json={**body, "data_parallel_rank": 5})
            assert r.status_code == 400 and "data_parallel_rank=5" in r.text
            r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "disagg_prefill_dp_rank": -1})
            assert r.status_code == 400 and "disagg_prefill_dp_rank" in r.text
            r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.json()["decode_dp_rank"] == 0 and r.json()["prefill_dp_rank"] == 0
        async with router_client(specs, honor_client_ranks=True) as (c, _):  # the header names the decode rank
            r = await c.post("/generate", json=body, headers={"X-Data-Parallel-Rank": "0"})
            assert r.status_code == 200 and r.json()["meta_info"]["decode_dp_rank"] == 0, r.text
            r = await c.post("/generate", json=body, headers={"X-Data-Parallel-Rank": "7"})
            assert r.status_code == 400 and "X-Data-Parallel-Rank=7" in r.text, r.text
            r = await c.post("/generate", json=body, headers={"X-Data-Parallel-Rank": "-1"})
            assert r.status_code == 400 and "X-Data-Parallel-Rank" in r.text, r.text
        async with router_client(specs) as (c, _):  # default: a named rank is refused, never replaced
            r = await c.post("/generate", json={**body, "data_parallel_rank": 5})
            assert r.status_code == 400 and "--honor-client-ranks" in r.text, r.text

    asyncio.run(run())


RANKS = ("x-prefill-dp-rank", "x-decode-dp-rank")


def served_by(headers) -> tuple[int, int]:
    return int(headers["x-prefill-dp-rank"]), int(headers["x-decode-dp-rank"])


def test_rank_headers_and_per_sample_meta_through_router_pd(pair):
    """Every route, streamed or not, answers with the ranks that served it (as headers, which the
    router relays, and as fields); with n > 1 every sample carries its own P/D meta_info."""
    specs = [WorkerSpec(pair[0].url, "prefill"), WorkerSpec(pair[1].url, "decode")]

    async def run() -> None:
        async with router_client(specs, honor_client_ranks=True) as (c, _):
            oai = openai.AsyncOpenAI(base_url=str(c.base_url) + "/v1", api_key="none", max_retries=0, timeout=120)
            model = (await oai.models.list()).data[0].id
            pin = {"data_parallel_rank": 0, "disagg_prefill_dp_rank": 0}
            raw = await oai.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, seed=3,
                extra_body=pin)
            assert served_by(raw.headers) == (0, 0)
            chat = raw.parse()
            for choice in chat.choices:
                meta = choice.model_extra["meta_info"]
                assert (meta["prefill_dp_rank"], meta["decode_dp_rank"]) == (0, 0)
                assert meta["bootstrap_room"] == chat.model_extra["bootstrap_room"]
                assert meta["kv_transfer_bytes"] > 0 and meta["kv_wait_ms"] is not None
            async with oai.completions.with_streaming_response.create(
                    model=model, prompt="Hello", max_tokens=4, n=3, seed=3, stream=True) as resp:
                assert served_by(resp.headers) == (0, 0)
                metas = {}
                async for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            if "meta_info" in ch:
                                metas[ch["index"]] = ch["meta_info"]
            assert sorted(metas) == [0, 1, 2]
            assert len({m["bootstrap_room"] for m in metas.values()}) == 1
            assert all(m["decode_dp_rank"] == 0 and m["kv_transfer_bytes"] > 0 for m in metas.values())
            body = {"text": "Hi", "sampling_params": {"max_new_tokens": 3, "n": 3, "temperature": 1.0}}
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            assert served_by(r.headers) == tuple(int(r.headers[h]) for h in RANKS)
            metas = [item["meta_info"] for item in r.json()]
            assert len(metas) == 3 and len({m["bootstrap_room"] for m in metas}) == 1
            for m in metas:
                assert (m["prefill_dp_rank"], m["decode_dp_rank"]) == served_by(r.headers)
                assert m["kv_transfer_bytes"] > 0 and m["kv_wait_ms"] is not None and "cached_tokens" in m
            async with c.stream("POST", "/generate", json={**body, "stream": True}) as resp:
                assert resp.status_code == 200 and all(h in resp.headers for h in RANKS)
                await resp.aread()

    asyncio.run(run())
    assert wait_until(lambda: idle(pair), 20)


def test_rank_headers_through_router_mixed(tmp_path):
    server = serve(["--dp-size", "2"], tmp_path, "mixed")
    try:
        server.wait_healthy()

        async def run() -> None:
            async with router_client([WorkerSpec(server.url, "mixed")]) as (c, state):
                oai = openai.AsyncOpenAI(base_url=str(c.base_url) + "/v1", api_key="none", max_retries=0,
                                         timeout=120)
                model = (await oai.models.list()).data[0].id
                seen = set()
                for _ in range(4):
                    raw = await oai.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=2)
                    assert "x-prefill-dp-rank" not in raw.headers
                    rank = int(raw.headers["x-decode-dp-rank"])
                    assert raw.parse().model_extra["decode_dp_rank"] == rank
                    seen.add(rank)
                    async with c.stream("POST", "/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                            "stream": True}) as resp:
                        assert resp.status_code == 200 and int(resp.headers["x-decode-dp-rank"]) in (0, 1)
                        await resp.aread()
                assert seen <= {0, 1}

        asyncio.run(run())
    finally:
        server.stop()
