"""Prefix cache: radix tree over pool references, eviction, events, and greedy identity with the cache off."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.engine.kv_pool import KVPool, PageRefError
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Req, SamplingParams
from pdserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, page_hashes

GREEDY = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def check_clean(core) -> None:
    """The end state of every scenario: no page held by a request or transfer, tree and pool agree."""
    core.kv_pool.check_integrity(expect_used=0)
    if core.prefix_cache is not None:
        core.prefix_cache.check_integrity()
        assert core.kv_pool.num_evictable == core.prefix_cache.num_pages


# ------------------------------------------------------------------ the tree over a bare pool
def bare(num_pages: int = 8, page_size: int = 2) -> tuple[KVPool, RadixCache]:
    pool = KVPool(num_pages, page_size, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    return pool, RadixCache(pool)


def test_cache_holds_its_own_reference_and_evicts_lru_unreferenced_leaves():
    pool, cache = bare()
    a = pool.alloc(3)
    assert cache.insert([1, 2, 3, 4, 5, 6, 7], a) == 3  # the half page (7) is not cached
    pool.unref(a)  # the request finished: the cache alone keeps the pages
    assert pool.num_used == 0 and pool.num_evictable == 3 and pool.num_free == 5
    b_prefix = cache.match([1, 2, 3, 4, 9, 9], 6)
    assert b_prefix == a[:2]
    pool.ref(b_prefix)  # a request shares the first two pages
    b = b_prefix + pool.alloc(1)
    cache.insert([1, 2, 3, 4, 9, 9], b)
    assert cache.reclaimable() == 1  # only [5, 6]: the shared pages are referenced, [9, 9] too
    pool.unref(b)
    cache.drain_events()
    assert pool.can_alloc(8) and not pool.can_alloc(9)
    got = pool.alloc(8)  # evicts all four cached pages, leaves first
    assert len(got) == 8 and cache.num_pages == 0
    removed = [h for e in cache.drain_events() for h in e.block_hashes]
    assert len(removed) == 4
    pool.unref(got)
    cache.check_integrity()
    pool.check_integrity(expect_used=0)


def test_lru_order_and_events_carry_chained_page_hashes():
    pool, cache = bare(num_pages=6)
    old, new = pool.alloc(2), pool.alloc(2)
    cache.insert([1, 1, 2, 2], old)
    cache.insert([3, 3, 4, 4], new)
    pool.unref(old + new)
    cache.match([1, 1, 2, 2], 4)  # touch: [3 3 4 4] is now the least recently used
    stored = cache.drain_events()
    assert [type(e) for e in stored] == [BlockStored, BlockStored]
    assert stored[0].block_hashes == page_hashes([1, 1, 2, 2], 2) and stored[0].parent_block_hash is None
    pool.alloc(4)  # two free, two evicted
    (removed,) = cache.drain_events()
    assert isinstance(removed, BlockRemoved) and set(removed.block_hashes) == set(page_hashes([3, 3, 4, 4], 2))
    assert cache.match([1, 1, 2, 2], 4) == old
    cache.reset()
    assert isinstance(cache.drain_events()[-1], AllBlocksCleared) and cache.num_pages == 0


def test_cache_reference_bugs_are_refused():
    pool, cache = bare()
    pages = pool.alloc(1)
    cache.insert([1, 2], pages)
    with pytest.raises(PageRefError, match="cache already holds"):
        pool.ref(pages, cache=True)
    pool.unref(pages)
    with pytest.raises(PageRefError, match="only the cache holds"):
        pool.unref(pages)  # a request releasing twice cannot take the cache's reference
    pool.check_integrity(expect_used=0)
    cache.check_integrity()


def reclaimable_by_walk(pool: KVPool, cache: RadixCache) -> int:
    """Pages whose whole subtree only the cache holds, counted from scratch (the memo's reference)."""

    def free_below(node) -> tuple[bool, int]:
        results = [free_below(child) for child in node.children.values()]
        all_free = all(ok for ok, _ in results) and (node is cache.root or pool.refcount(node.page) == 1)
        return all_free, sum(n for _, n in results) + (all_free and node is not cache.root)

    return free_below(cache.root)[1]


def test_eviction_never_touches_referenced_pages_under_random_stress():
    rng = random.Random(1)
    pool, cache = bare(num_pages=24, page_size=2)
    held: list[tuple[list[int], list[int]]] = []
    for _ in range(600):
        if held and (rng.random() < 0.45 or not pool.can_alloc(4)):
            tokens, pages = held.pop(rng.randrange(len(held)))
            cache.insert(tokens, pages)
            pool.unref(pages)
        else:
            tokens = [rng.randrange(3) for _ in range(rng.randint(1, 8))]
            prefix = cache.match(tokens, len(tokens) - 1)
            pool.ref(prefix)
            need = pool.pages_for(len(tokens)) - len(prefix)
            if not pool.can_alloc(need):
                pool.unref(prefix)
                continue
            protected = {p for _, ps in held for p in ps} | set(prefix)
            assert cache.reclaimable() == reclaimable_by_walk(pool, cache)
            fresh = pool.alloc(need)
            assert cache.reclaimable() == reclaimable_by_walk(pool, cache)
            assert not protected & set(fresh), "eviction handed out a referenced page"
            held.append((tokens, prefix + fresh))
        pool.check_integrity()
        cache.check_integrity()
    for _tokens, pages in held:
        pool.unref(pages)
    pool.check_integrity(expect_used=0)
    assert cache.num_evicted > 0 and cache.num_pages == pool.num_evictable


# ------------------------------------------------------------------ engine: cache on vs off
@pytest.fixture(scope="module")
def engines():
    """Same tiny model twice: page size 5 (divides no prefix below), small chunks, a small pool with
    no decode reserve (so the pool runs dry and retraction happens)."""
    opts = dict(page_size=5, max_total_tokens=250, chunked_prefill_size=12, num_reserved_decode_tokens=0)
    on, off = Engine(None, **opts), Engine(None, disable_radix_cache=True, **opts)
    yield on, off
    on.shutdown()
    off.shutdown()


def _run(core, reqs: list[Req], abort_at: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Step ``core`` until every request finished, aborting some at given steps; integrity each step."""
    for req in reqs:
        core.add_request(req)
    out: dict[str, list[int]] = {r.rid: [] for r in reqs}
    step = 0
    while core.has_work():
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_token_ids)
        step += 1
        if abort_at and step in abort_at:
            core.abort(abort_at[step])
        core.kv_pool.check_integrity()
        assert step < 5000
    return out


def test_shared_prefix_is_not_recomputed_and_output_matches_cache_off(engines):
    on, off = engines
    rng = random.Random(3)
    system = [rng.randrange(on.core.vocab_size) for _ in range(33)]  # 6 full pages of 5 and 3 tokens
    questions = [[rng.randrange(on.core.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    on.core.flush_cache()
    first = on.generate(input_ids=system + questions[0], sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    computed = on.core.scheduler.prefill_tokens_computed
    for q in questions[1:]:
        ours = on.generate(input_ids=system + q, sampling_params=GREEDY)
        ref = off.generate(input_ids=system + q, sampling_params=GREEDY)
        assert ours["output_ids"] == ref["output_ids"]
        assert ours["meta_info"]["cached_tokens"] == 30  # whole pages of the shared prefix only
    assert on.core.scheduler.prefill_tokens_computed - computed == sum(len(q) + 3 for q in questions[1:])
    # a fully cached prompt still computes its last token (its logits pick the first output)
    again = on.generate(input_ids=system + questions[1], sampling_params=GREEDY)
    assert again["output_ids"] == off.generate(input_ids=system + questions[1], sampling_params=GREEDY)["output_ids"]
    exact = system[:30]
    assert on.generate(input_ids=exact, sampling_params=GREEDY)["meta_info"]["cached_tokens"] == 25
    assert on.core.load()["cache_hit_rate"] > 0.5
    check_clean(on.core)
    check_clean(off.core)


def test_prompts_sharing_a_prefix_with_running_requests_chunked_across_the_boundary(engines):
    """Requests arrive while the first is still prefilling/decoding; chunks of 12 over pages of 5
    cross the cached boundary; some get retracted in a pool this small, two are aborted midway."""
    on, off = engines
    on.core.flush_cache()
    rng = random.Random(5)
    vocab = on.core.vocab_size
    base = [rng.randrange(vocab) for _ in range(27)]
    prompts = [base + [rng.randrange(vocab) for _ in range(rng.randint(0, 14))] for _ in range(6)]
    prompts += [base[:11] + [rng.randrange(vocab) for _ in range(20)] for _ in range(3)]
    params = SamplingParams.from_dict({**GREEDY, "max_new_tokens": 30, "min_new_tokens": 30})

    def reqs() -> list[Req]:
        return [Req(f"r{i}", list(p), params) for i, p in enumerate(prompts)]

    ref = _run(off.core, reqs())
    staged = reqs()
    ours = _run(on.core, staged[:1])  # warm the cache with one, then all at once
    ours.update(_run(on.core, staged[1:], abort_at={4: "r3", 15: "r7"}))
    for rid in ref:
        if rid in ("r3", "r7"):
            assert ours[rid] == ref[rid][: len(ours[rid])]
        else:
            assert ours[rid] == ref[rid], rid
    assert sum(r.cached_tokens for r in staged[1:]) > 0
    assert sum(r.num_retractions for r in staged) > 0, "the pool never ran dry: no retraction exercised"
    check_clean(on.core)


def test_input_logprobs_with_a_cached_prefix_match_cache_off(engines):
    on, off = engines
    prompt = list(range(3, 40))
    on.generate(input_ids=prompt, sampling_params=GREEDY)
    kw = dict(input_ids=prompt, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
    ours, ref = on.generate(**kw)["meta_info"], off.generate(**kw)["meta_info"]
    assert ours["cached_tokens"] == 0  # every position's logits were needed
    for (a, ta, _), (b, tb, _) in zip(ours["input_token_logprobs"], ref["input_token_logprobs"]):
        assert ta == tb and (a is None and b is None or abs(a - b) < 1e-4)
    tail = on.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True, logprob_start_len=20)
    assert tail["meta_info"]["cached_tokens"] == 15
    check_clean(on.core)


def test_flush_cache_refuses_while_requests_run_and_empties_when_idle(engines):
    on, _ = engines
    core = on.core
    on.generate(input_ids=list(range(50, 80)), sampling_params=GREEDY)
    assert core.prefix_cache.num_pages > 0
    core.add_request(Req("busy", list(range(50, 80)), SamplingParams.from_dict(GREEDY)))
    assert "1 requests" in core.flush_cache()
    assert core.prefix_cache.num_pages > 0
    _run(core, [])
    assert core.flush_cache() is None
    assert core.prefix_cache.num_pages == 0 and core.kv_pool.num_free == core.kv_pool.num_pages
    check_clean(core)
