"""A page left holding NaN/inf by an earlier owner (a request whose forward produced non-finite
values, a peer that sent garbage) never reaches a later request's output: every free page of the pool
is filled with NaN or inf before and between waves of requests, and greedy output (prefill chunks with
a cached prefix, decode rows of ragged lengths, padded decode buffers) stays identical to a clean pool
on every attention path: the native kernel, and the gather + SDPA path CUDA uses (``PDSERVE_NATIVE=0``)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.request import Req, SamplingParams
from pdserve.models import native

PAGE_SIZE = 4
OUTPUT_LENS = [3, 6, 9, 13]  # decode batches shrink as requests finish: padded groups and buckets


@pytest.fixture(params=["native", "gather"])
def attention_path(request, monkeypatch):
    """``gather``: as with ``PDSERVE_NATIVE=0`` (no native kernel at all, the PyTorch paths CUDA runs)."""
    if request.param == "gather":
        monkeypatch.setattr(native, "_tried", True)
        monkeypatch.setattr(native, "_loaded", None)
    elif native.kernels() is None:
        pytest.skip("no C compiler for the native kernel")
    return request.param


def _engine() -> Engine:
    # chunks of 16 tokens: prompts span several chunks, so later chunks attend a prefix in the pool
    return Engine(None, page_size=PAGE_SIZE, max_total_tokens=1024, chunked_prefill_size=16)


def poison(pool: KVPool, extra: list[int] = ()) -> int:
    """Fill every free page (and ``extra``) of every layer with NaN (even pages) or inf (odd pages)."""
    pages = [p for p in range(pool.num_pages) if pool.refcount(p) == 0] + list(extra)
    for layer in pool.layers:
        for page in pages:
            layer[page] = float("nan") if page % 2 == 0 else float("inf")
    return len(pages)


def _waves(core: EngineCore, waves: list[list[list[int]]], before_wave) -> dict[str, tuple[list[int], object]]:
    results: dict[str, tuple[list[int], object]] = {}
    for w, prompts in enumerate(waves):
        before_wave()
        tokens: dict[str, list[int]] = defaultdict(list)
        reasons: dict[str, object] = {}
        for i, (prompt, n) in enumerate(zip(prompts, OUTPUT_LENS, strict=True)):
            core.add_request(Req(f"w{w}r{i}", list(prompt), SamplingParams.from_dict(
                {"max_new_tokens": n, "min_new_tokens": n, "temperature": 0})))
        while core.has_work():
            for out in core.step():
                tokens[out.rid] += out.new_token_ids
                if out.finished:
                    reasons[out.rid] = out.finish_reason
        results.update({rid: (tokens[rid], reasons.get(rid)) for rid in tokens})
    return results


def _prompts(vocab: int) -> list[list[list[int]]]:
    """Two waves; the second shares the first's prefixes (prefix-cache hits mid-page and across pages)."""
    rng = random.Random(11)
    shared = [rng.randrange(4, vocab) for _ in range(23)]
    first = [shared[:n] + [rng.randrange(4, vocab) for _ in range(m)] for n, m in ((23, 18), (9, 2), (17, 30), (5, 7))]
    second = [shared[:n] + [rng.randrange(4, vocab) for _ in range(m)] for n, m in ((23, 5), (13, 20), (21, 1), (6, 33))]
    return [first, second]


@pytest.mark.parametrize("static_buffers", [False, True], ids=["eager", "static-buffers"])
def test_nan_in_reused_pages_never_reaches_output(attention_path, static_buffers):
    clean, poisoned = _engine(), _engine()
    try:
        waves = _prompts(clean.core.vocab_size)
        held: list[int] = []
        if static_buffers:
            for engine in (clean, poisoned):
                engine.core.runner.enable_decode_graphs(max_bs=8, context_length=engine.core.context_length)
            held = [poisoned.core.runner.decode_graphs.scratch_page]
        expected = _waves(clean.core, waves, lambda: None)
        assert all(reason["type"] == "length" for _, reason in expected.values()), expected

        pool = poisoned.core.kv_pool
        counts: list[int] = []
        got = _waves(poisoned.core, waves, lambda: counts.append(poison(pool, held)))

        assert got == expected
        assert counts[0] == pool.num_pages and counts[1] > 0  # every page poisoned at first, free ones again later
        assert poisoned.core.scheduler.cached_tokens_total > 0  # the second wave did attend cached prefixes
        if static_buffers:
            assert poisoned.core.runner.decode_graphs.runs
        pool.check_integrity()
    finally:
        clean.shutdown()
        poisoned.shutdown()
