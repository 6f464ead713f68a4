"""Cache-based routing through real servers: ``cache_aware`` on text prompts (the router tokenizes
with the servers' tokenizer and follows their ``/kv_events``), the ``prefix`` decode policy keeping a
conversation on its decode rank so decode reuses its KV (reported in OpenAI ``usage``), and bad input.

One P/D pair (prefill DP 2, decode DP 2, page size 16) serves every test of the module.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from pdserve.kv_events import page_hashes
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import WorkerSpec
from pdserve.router.prefix_index import CONFIRMED
from tests.router_harness import router_client
from tests.server_harness import free_port, launch, wait_until

PAGE = 16
SERVER_FLAGS = ["--max-total-tokens", "4096", "--page-size", str(PAGE), "--chunked-prefill-size", "128",
                "--log-level", "warning", "--dp-size", "2"]
SYSTEMS = [f"System prompt {g}: you answer questions about topic number {g} with care and precision. " * 3
           for g in range(3)]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    """(prefill, decode) servers."""
    logs = tmp_path_factory.mktemp("router-cache")
    prefill = launch([*SERVER_FLAGS, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                      str(free_port())],
                     logs)
    decode = None
    try:
        decode = launch([*SERVER_FLAGS, "--disaggregation-mode", "decode"], logs)
        prefill.wait_healthy()
        decode.wait_healthy()
        yield prefill, decode
    finally:
        prefill.stop()
        if decode is not None:
            decode.stop()


def specs(pd) -> list[WorkerSpec]:
    prefill, decode = pd
    return [WorkerSpec(prefill.url, "prefill"), WorkerSpec(decode.url, "decode")]


def used_pages(url: str) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(url + "/get_load", timeout=10).json())


def assert_idle(pd) -> None:
    assert wait_until(lambda: all(used_pages(s.url) == 0 for s in pd), 20.0)


def test_cache_aware_routes_a_repeated_text_prefix_to_one_unit(pd):
    """Text prompts are tokenized by the router with the servers' tokenizer and matched by the
    engine's page hashes on both sides; the servers' /kv_events confirm the pages it predicted."""

    async def run() -> None:
        async with router_client(specs(pd), prefill_policy="cache_aware", decode_policy="cache_aware",
                                 cache_threshold=0.3, balance_abs_threshold=100_000) as (c, state):
            placements: dict[int, set[tuple[int, int]]] = {}
            for question in range(3):
                for g, system in enumerate(SYSTEMS):
                    r = await c.post("/generate", json={
                        "text": system + f"Question {question}: why?",
                        "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
                    assert r.status_code == 200, r.text
                    meta = r.json()["meta_info"]
                    placements.setdefault(g, set()).add((meta["prefill_dp_rank"], meta["decode_dp_rank"]))
                    if question:
                        assert meta["cached_tokens"] >= 2 * PAGE, meta  # prefill reused the system prompt
            assert all(len(p) == 1 for p in placements.values()), placements
            loads = (await c.get("/get_loads")).json()["units"]
            assert sum(u["cached_pages_known"] for u in loads) >= 3 * 4  # 3 system prompts of 4+ pages
            assert state.prompt_tokenizer is not None
            model_path = state.fleet.workers[pd[0].url].info["model_path"]
            tokenizer = state.prompt_tokenizer.tokenizers[model_path]
            assert tokenizer is not None
            # the page hashes of the system prompt, as the router computes them, are confirmed by the
            # servers' events on the very units the requests went to (prefill and decode)
            ids = Tokenizer(model_path).encode(SYSTEMS[0] + "Question 0: why?")
            hashes = page_hashes(ids, PAGE)[:4]
            (p_rank, d_rank), = placements[0]
            for url, rank in ((pd[0].url, p_rank), (pd[1].url, d_rank)):
                unit = state.fleet.workers[url].units[rank]

                def confirmed(unit=unit) -> bool:
                    cache = state.cache_index.units.get(unit)
                    return cache is not None and all(cache.pages.get(h) == CONFIRMED for h in hashes)

                for _ in range(100):
                    if confirmed():
                        break
                    await asyncio.sleep(0.05)
                assert confirmed(), (url, rank)

    asyncio.run(run())
    assert_idle(pd)


def test_prefix_decode_policy_keeps_a_conversation_on_its_decode_rank(pd):
    """Three interleaved chats of three turns: each stays on one decode rank, and from turn 2 on the
    decode rank reuses the previous turns' KV (usage says so; prefill sent only the suffix)."""

    async def run() -> None:
        async with router_client(specs(pd), prefill_policy="least_load", decode_policy="prefix",
                                 balance_abs_threshold=100_000) as (c, _):
            oai = openai.AsyncOpenAI(base_url=str(c.base_url) + "/v1", api_key="none", max_retries=0, timeout=60)
            model = (await oai.models.list()).data[0].id
            chats = [[{"role": "system", "content": SYSTEMS[g]}] for g in range(3)]
            ranks: dict[int, set[int]] = {g: set() for g in range(3)}
            for turn in range(3):
                for g, chat in enumerate(chats):
                    chat.append({"role": "user", "content": f"Turn {turn} of chat {g}: tell me more."})
                    raw = await oai.chat.completions.with_raw_response.create(
                        model=model, messages=chat, max_tokens=4, temperature=0)
                    body = raw.http_response.json()
                    reply = raw.parse()
                    ranks[g].add(body["decode_dp_rank"])
                    details = reply.usage.prompt_tokens_details
                    decode_cached = details.model_extra["decode_cached_tokens"]
                    if turn:
                        assert decode_cached >= 2 * PAGE, (g, turn, details)
                        assert details.cached_tokens >= decode_cached
                    else:
                        assert decode_cached == 0
                    chat.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
            assert all(len(r) == 1 for r in ranks.values()), ranks
            chats[0].append({"role": "user", "content": "And streamed?"})
            stream = await oai.chat.completions.create(model=model, messages=chats[0], max_tokens=4, temperature=0,
                                                       stream=True, stream_options={"include_usage": True})
            usage = [chunk.usage async for chunk in stream if chunk.usage is not None][-1]
            assert usage.prompt_tokens_details.model_extra["decode_cached_tokens"] >= 2 * PAGE
            await oai.close()

    asyncio.run(run())
    assert_idle(pd)


def test_bad_prompts_pass_through_cache_routing_to_the_servers_answer(pd):
    """A body the router cannot tokenize is routed by its character blocks; the server names the
    bad field; nothing is left behind."""

    async def run() -> None:
        async with router_client(specs(pd), prefill_policy="cache_aware", decode_policy="prefix") as (c, _):
            bad = [
                ("/v1/chat/completions", {"messages": "not a list", "max_tokens": 2}, "messages"),
                ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}], "max_tokens": 2}, "messages"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}],
                                          "max_tokens": 2}, "messages"),
                ("/generate", {"text": ["a", 5], "sampling_params": {"max_new_tokens": 2}}, "text"),
            ]
            for route, body, field in bad:
                r = await c.post(route, json=body)
                assert r.status_code == 400 and field in r.text, (route, body, r.status_code, r.text)
            long = "word " * 60_000  # over the router's tokenization cut: still routed, answered by the server
            r = await c.post("/generate", json={"text": long, "sampling_params": {"max_new_tokens": 1}})
            assert r.status_code == 400 and "text" in r.text

    asyncio.run(run())
    assert_idle(pd)


def test_multi_turn_bench_sends_turns_in_order_through_the_prefix_policy(pd):
    from pdserve.bench.serving import ServingConfig, benchmark_async

    async def run() -> None:
        async with router_client(specs(pd), prefill_policy="cache_aware", decode_policy="prefix") as (c, _):
            config = ServingConfig(base_url=str(c.base_url), dataset="multi-turn", mt_num_conversations=3,
                                   mt_turns_min=2, mt_turns_max=3, mt_system_prompt_len=40, mt_question_len=8,
                                   mt_output_len=4, warmup_requests=0, disable_tqdm=True)
            result = await benchmark_async(config)
            assert result.metrics["completed"] == len(result.records) >= 6
            from pdserve.bench.serving import _build_requests

            requests = _build_requests(config, Tokenizer(state_model_path(pd)))
            for conv in {r.conversation for r in requests}:
                turns = [result.records[i] for i, r in enumerate(requests) if r.conversation == conv]
                for prev, cur in zip(turns, turns[1:]):
                    assert cur.start >= prev.start + prev.latency - 1e-3

    asyncio.run(run())
    assert_idle(pd)


def state_model_path(pd) -> str:
    return httpx.get(pd[0].url + "/server_info", timeout=10).json()["model_path"]
