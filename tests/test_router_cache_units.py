"""Router cache state without servers: the prefix policy and its load guard, the cache index and
/kv_events application, prompt tokenization, and bad values of the new options."""

from __future__ import annotations

import argparse
import asyncio
import math
import random

import pytest

from pdserve.kv_events import page_hashes
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import RouterConfig, add_arguments, router_config_from_args
from pdserve.router.kv_event_watch import apply_batches
from pdserve.router.policies import make_policy
from pdserve.router.policies.cache_aware import CacheAwarePolicy
from pdserve.router.policies.prefix import PrefixPolicy
from pdserve.router.prefix_index import CONFIRMED, CacheIndex, UnitCache
from pdserve.router.prompt_tokens import CUT_TOKENS, MAX_TOKENIZED_CHARS, PromptTokenizer
from pdserve.router.request_info import RequestInfo, request_info
from pdserve.router.worker import Unit, Worker

MODEL = "/models/m"


def units_of(url: str, dp_size: int, page_size: int = 4) -> list[Unit]:
    worker = Worker(url, "decode")
    worker.set_info({"dp_size": dp_size, "page_size": page_size, "model_path": MODEL})
    return worker.units


def tokens(ids: tuple[int, ...]) -> RequestInfo:
    """A text prompt the router tokenized to ``ids``."""
    return RequestInfo("t" * len(ids), len(ids), 8, None).with_tokens(ids, MODEL)


def test_prefix_policy_keeps_each_conversation_on_its_unit() -> None:
    units = units_of("http://a:1", 2) + units_of("http://b:1", 2)
    policy = PrefixPolicy(abs_threshold=10_000, rng=random.Random(0))
    convs = [tuple(range(100 * c, 100 * c + 12)) for c in range(6)]
    homes = [policy.select(units, tokens(conv)) for conv in convs]
    assert len(set(homes)) > 1  # first turns go by load (ties at random)
    for turn in range(1, 4):
        for c, conv in enumerate(convs):
            convs[c] = conv + (7,) * 5 + (c, turn) * 3
            assert policy.select(units, tokens(convs[c])) is homes[c], (c, turn)


def test_prefix_policy_load_guard_leaves_an_overloaded_unit() -> None:
    units = units_of("http://a:1", 2)
    policy = PrefixPolicy(abs_threshold=64, rel_threshold=1.5, rng=random.Random(0))
    conv = tuple(range(40))
    home = policy.select(units, tokens(conv))
    home.begin(50)  # within the guard: still goes home
    assert policy.select(units, tokens(conv + (1, 2, 3, 4))) is home
    home.begin(1000)  # 1050 vs 0 tokens: beyond both thresholds
    other = policy.select(units, tokens(conv + (5, 6, 7, 8)))
    assert other is not home
    home.end(1050)
    # the moved conversation's pages are now predicted on the other unit as well: it stays there
    assert policy.select(units, tokens(conv + (5, 6, 7, 8, 9))) is other


def test_cache_aware_matches_tokenized_text_only_on_servers_of_that_tokenizer() -> None:
    units = units_of("http://a:1", 2, page_size=4)
    foreign = Worker("http://c:1", "decode")
    foreign.set_info({"dp_size": 1, "page_size": 4, "model_path": "/other/model"})
    index = CacheIndex()
    policy = CacheAwarePolicy(index, threshold=0.5, abs_threshold=10_000, rng=random.Random(0))
    ids = tuple(range(32))
    first = policy.select(units, tokens(ids))
    assert index.match(first, page_hashes(ids, 4)) == 8  # token pages, the engine's hashes
    assert policy.select(units, tokens(ids + (99,))) is first
    assert index.prompt_hashes(foreign.units[0], tokens(ids))[1] == index.block_chars  # text blocks there


def test_predictions_expire_while_a_feed_is_live_and_events_rule() -> None:
    unit = units_of("http://a:1", 1)[0]
    index = CacheIndex()
    index.live_feeds.add(unit.worker)
    hashes = page_hashes(tuple(range(12)), 4)
    index.predict(unit, hashes)
    cache = index.units[unit]
    assert index.match(unit, hashes) == 3
    assert cache.match(hashes, now=math.inf) == 0  # never confirmed: lapsed
    index.predict(unit, hashes)
    events = [
        {"dp_rank": 0, "events": [{"type": "BlockStored", "block_hashes": hashes[:2]}]},
        {"dp_rank": 0, "events": [{"type": "BlockRemoved", "block_hashes": [hashes[0]]}, "junk", {"type": "?"}]},
        {"dp_rank": 7, "events": [{"type": "AllBlocksCleared"}]},  # no such rank: skipped
        {"dp_rank": "0", "events": []}, None,
    ]
    assert apply_batches(index, unit.worker, events) == 2
    assert cache.pages.get(hashes[1]) == CONFIRMED and hashes[0] not in cache.pages
    assert index.match(unit, hashes) == 0  # the first page is gone: nothing leads
    apply_batches(index, unit.worker, [{"dp_rank": 0, "events": [{"type": "AllBlocksCleared"}]}])
    assert len(cache) == 0
    assert apply_batches(index, unit.worker, "not a list") == 0


def test_unit_cache_capacity_keeps_the_most_recent() -> None:
    cache = UnitCache(capacity=2)
    cache.confirm([1, 2])
    cache.predict([3], math.inf)
    assert list(cache.pages) == [2, 3]


def test_prompt_tokenizer_matches_the_servers_tokenization() -> None:
    path = default_model_path()
    tok = Tokenizer(path)
    prompts = PromptTokenizer()

    async def run() -> None:
        text_body = {"text": "Hello there, a prompt", "sampling_params": {}}
        info = await prompts.annotate("/generate", text_body, request_info("/generate", text_body), path)
        assert info.token_ids == tuple(tok.encode(text_body["text"])) and info.prompt_tokens == len(info.token_ids)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]
        chat = {"messages": messages}
        info = await prompts.annotate("/v1/chat/completions", chat, request_info("/v1/chat/completions", chat), path)
        flat = [messages[0], {"role": "user", "content": "Hi you"}]
        want = tok.encode(tok.apply_chat_template(flat, add_generation_prompt=True), add_special_tokens=False)
        assert info.token_ids == tuple(want)
        long = {"prompt": "word " * (MAX_TOKENIZED_CHARS // 4)}
        info = await prompts.annotate("/v1/completions", long, request_info("/v1/completions", long), path)
        full = tok.encode(long["prompt"][:MAX_TOKENIZED_CHARS])
        assert info.token_ids == tuple(full[:-CUT_TOKENS])
        for body in ({"messages": "x"}, {"messages": [{"role": "user", "content": 5}]}, {"messages": []}):
            plain = request_info("/v1/chat/completions", body)
            assert await prompts.annotate("/v1/chat/completions", body, plain, path) is plain
        batch = {"text": ["a", "b"]}
        plain = request_info("/generate", batch)
        assert await prompts.annotate("/generate", batch, plain, path) is plain

    asyncio.run(run())


def test_prompt_tokenizer_without_a_tokenizer_falls_back(tmp_path) -> None:
    prompts = PromptTokenizer()
    body = {"text": "hello"}
    plain = request_info("/generate", body)

    async def run() -> None:
        for _ in range(2):  # the failed load is remembered, not retried per request
            assert await prompts.annotate("/generate", body, plain, str(tmp_path)) is plain

    asyncio.run(run())
    assert prompts.tokenizers == {str(tmp_path): None}


@pytest.mark.parametrize("field, value, message", [
    ("balance_rel_threshold", math.nan, "balance_rel_threshold"),
    ("balance_rel_threshold", 0.5, "balance_rel_threshold"),
    ("balance_rel_threshold", math.inf, "balance_rel_threshold"),
    ("balance_abs_threshold", -1, "balance_abs_threshold"),
    ("max_tree_size", 0, "max_tree_size"),
    ("cache_threshold", math.nan, "cache_threshold"),
    ("decode_policy", "prefixx", "unknown policy"),
])
def test_bad_cache_options_are_refused_by_name(field: str, value: object, message: str) -> None:
    config = RouterConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_cache_flags_parse() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--pd-disaggregation", "--decode-policy", "prefix", "--disable-kv-events",
                              "--disable-prompt-tokenization", "--balance-rel-threshold", "2"])
    config = router_config_from_args(args)
    assert config.decode_policy == "prefix" and not config.kv_events and not config.tokenize_prompts
    assert isinstance(make_policy(config.decode_policy, config), PrefixPolicy)
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode-policy", "nope"])


def test_event_watcher_follows_restarts_and_survives_lying_feeds() -> None:
    """A scripted peer: a normal batch, then its numbering restarts (the router resets that server's
    units and starts over), then garbage, then a stored page again; a peer without the endpoint is
    left to predictions. No answer stalls or kills the watcher."""
    import aiohttp
    from aiohttp import web

    from pdserve.router.kv_event_watch import KVEventWatcher
    from tests.router_harness import free_port, wait_for

    def stored(rank: int, hashes: list[int]) -> dict:
        return {"seq": 1, "ts": 0.0, "dp_rank": rank, "events": [{"type": "BlockStored", "block_hashes": hashes,
                                                                   "parent_block_hash": None, "token_ids": [],
                                                                   "block_size": 4}]}

    script = [
        {"last_seq": 5, "lost": False, "batches": [stored(0, [11, 12]), stored(1, [21])]},
        {"last_seq": 1, "lost": False, "batches": []},  # restarted: below 5
        "not json at all",
        {"last_seq": "x"},
        {"last_seq": 2, "lost": False, "batches": [stored(1, [31]), {"dp_rank": 9, "events": [{}]}]},
    ]
    seen: list[str] = []

    async def kv_events(request: web.Request) -> web.StreamResponse:
        seen.append(request.query["after"])
        step = len(seen) - 1
        if step >= len(script):
            await asyncio.sleep(float(request.query["timeout"]) / 20)
            return web.json_response({"last_seq": 2, "lost": False, "batches": []})
        answer = script[step]
        return web.Response(text=answer) if isinstance(answer, str) else web.json_response(answer)

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/kv_events", kv_events)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        worker, absent = Worker(f"http://127.0.0.1:{port}", "prefill"), Worker(f"http://127.0.0.1:{port}0", "decode")
        absent.url = f"http://127.0.0.1:{port}/nothing"  # answers 404
        for w in (worker, absent):
            w.set_info({"dp_size": 2})
            w.healthy = True
        index = CacheIndex()
        import pdserve.router.kv_event_watch as watch

        old_retry = watch.RETRY_S
        watch.RETRY_S = 0.01
        watcher = KVEventWatcher(index, {}, 1.0)
        try:
            async with aiohttp.ClientSession() as session:
                watcher.sync(session, [worker, absent])
                assert await wait_for(lambda: len(seen) >= 2)
                assert await wait_for(lambda: len(seen) >= 6)
                caches = [index.cache(u).pages for u in worker.units]
                assert list(caches[0]) == [] and list(caches[1]) == [31]  # reset at the restart, then rebuilt
                assert seen[:3] == ["0", "5", "0"] and worker in index.live_feeds
                assert absent in watcher.unsupported and watcher.tasks[absent].done()
                assert not watcher.tasks[worker].done()
                worker.healthy = False
                watcher.sync(session, [worker, absent])
                assert not watcher.tasks and worker not in index.live_feeds  # the 404 one is not polled again
                await watcher.stop()
        finally:
            watch.RETRY_S = old_retry
            await runner.cleanup()

    asyncio.run(run())
