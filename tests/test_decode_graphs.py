"""Decode over static padded buffers (the CUDA-graph path, run eagerly on CPU) against the eager runner:
same greedy tokens at batch sizes between buckets, padded rows writing only the scratch page the pool
holds for them, and a P/D handoff decoding over the same buffers."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from pdserve.engine import decode_graphs
from pdserve.engine.decode_graphs import batch_buckets
from pdserve.engine.engine import Engine
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.kv_pool import PageRefError
from pdserve.engine.request import Req, RequestError, SamplingParams
from pdserve.models import native

PAGE_SIZE = 4
OUTPUT_LENS = [3, 5, 7, 9, 12, 16]  # requests finish one by one: decode batches of 6, 5, 4, 3, 2, 1 rows


@pytest.fixture(params=["native", "gather"])
def attention_path(request, monkeypatch):
    """The native CPU kernel, or the fixed-shape gather + SDPA path a CUDA graph captures."""
    if request.param == "gather":
        monkeypatch.setattr(native, "supports", lambda q, kv_layer: False)
    elif native.kernels() is None:
        pytest.skip("no C compiler for the native kernel")
    return request.param


def _engine() -> Engine:
    return Engine(None, page_size=PAGE_SIZE, max_total_tokens=1024, chunked_prefill_size=48, disable_radix_cache=True)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams.from_dict({"max_new_tokens": n, "min_new_tokens": n, "temperature": 0})


def _serve(core: EngineCore, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, (prompt, n) in enumerate(zip(prompts, OUTPUT_LENS, strict=True)):
        core.add_request(Req(f"r{i}", list(prompt), _greedy(n)))
    tokens: dict[str, list[int]] = defaultdict(list)
    while core.has_work():
        for out in core.step():
            tokens[out.rid] += out.new_token_ids
    return dict(tokens)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    with pytest.raises(ValueError, match="batch size"):
        batch_buckets(0)


def test_static_decode_matches_eager_and_writes_only_the_scratch_page(attention_path, monkeypatch):
    eager, static = _engine(), _engine()
    try:
        rng = random.Random(3)
        vocab = eager.core.vocab_size
        prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(5, 40))] for _ in OUTPUT_LENS]
        expected = _serve(eager.core, prompts)

        pool = static.core.kv_pool
        graphs = static.core.runner.enable_decode_graphs(max_bs=8, context_length=static.core.context_length)
        scratch = graphs.scratch_page
        assert pool.refcount(scratch) == 1 and pool.num_reserved == 1 and graphs.graphs == {}  # no capture on CPU
        handed_out: set[int] = set()
        alloc = pool.alloc

        def recording_alloc(count: int) -> list[int]:
            pages = alloc(count)
            handed_out.update(pages)
            return pages

        monkeypatch.setattr(pool, "alloc", recording_alloc)
        got = _serve(static.core, prompts)

        assert got == expected
        assert {(5, 8), (3, 4)} <= set(graphs.runs)  # batch sizes between buckets were padded
        assert set(graphs.width_runs) == {graphs.widths[0]} and graphs.widths[0] < graphs.width  # short rows: narrow
        assert scratch not in handed_out
        pool.check_integrity(expect_used=0)  # only the scratch page stays held, reserved, not in use
        assert pool.refcount(scratch) == 1 and pool.num_reserved == 1
        untouched = [p for p in range(pool.num_pages) if p not in handed_out and p != scratch]
        assert untouched, "the test should leave some pages never handed out"
        for layer in pool.layers:
            assert layer.shape == (pool.num_pages, 2, PAGE_SIZE, *layer.shape[3:])  # P/D page layout
            assert not layer[untouched].any(), "a padded row wrote outside the scratch page"
            assert layer[scratch].any()  # padded rows did write there
    finally:
        eager.shutdown()
        static.shutdown()


def test_steps_take_the_narrowest_width_that_fits(attention_path, monkeypatch):
    """Rows growing past a width move the step to the next one (and back as long rows finish); stale
    table columns of a wider step never leak into a narrower one: output equals the eager engine's."""
    monkeypatch.setattr(decode_graphs, "GRAPH_WIDTHS", (8, 16, 32, 4096))  # 2, 4, 8 pages, then the table
    eager, static = _engine(), _engine()
    try:
        rng = random.Random(7)
        prompts = [[rng.randrange(4, eager.core.vocab_size) for _ in range(n)] for n in (3, 5, 13, 6, 25, 2)]
        expected = _serve(eager.core, prompts)
        graphs = static.core.runner.enable_decode_graphs(max_bs=8, context_length=static.core.context_length)
        assert graphs.widths[:3] == [2, 4, 8] and graphs.widths[-1] == graphs.width
        fill, widths = graphs._fill, []
        monkeypatch.setattr(graphs, "_fill", lambda decodes, bs: widths.append(fill(decodes, bs)) or widths[-1])
        assert _serve(static.core, prompts) == expected
        # the batch starts within 32 tokens, its 25-token prompt's row passes 32 (the whole table); once
        # that finished, the rows left fit in 16 tokens, until the 2-token prompt's row passes 16
        steps = [w for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]]
        assert steps == [8, graphs.width, 4, 8], widths
        static.core.kv_pool.check_integrity(expect_used=0)
    finally:
        eager.shutdown()
        static.shutdown()


def test_prefill_handoff_decodes_over_static_buffers(attention_path):
    """P/D: pages prefilled by one engine, copied page by page into one whose decode runs over the
    static buffers; the output equals the colocated eager engine's."""
    prefill_engine, decode_engine = _engine(), _engine()
    try:
        prefill, decode = prefill_engine.core, decode_engine.core
        graphs = decode.runner.enable_decode_graphs(max_bs=4, context_length=decode.context_length)
        prompt = prefill_engine.tokenizer.encode("The history of the world in a few words")
        expected = prefill_engine.generate(input_ids=prompt, sampling_params={
            "max_new_tokens": 10, "min_new_tokens": 10, "temperature": 0})["output_ids"]

        p_req = Req("pd", list(prompt), _greedy(10), stop_after_prefill=True)
        prefill.add_request(p_req)
        outs = []
        while prefill.has_work():
            outs += prefill.step()
        d_req = Req("pd", list(prompt), _greedy(10))
        decode.validate(d_req)
        decode.scheduler.add_prefilled_request(d_req)
        assert graphs.scratch_page not in d_req.pages
        for layer in range(len(prefill.kv_pool.layers)):
            for src, dst in zip(p_req.pages, d_req.pages, strict=True):
                decode.kv_pool.page_view(layer, dst).copy_(prefill.kv_pool.page_view(layer, src))
        prefill.scheduler.release("pd")
        decode.scheduler.activate_prefilled("pd", outs[-1].new_token_ids[0])
        tokens: list[int] = []  # the first token comes out of the first step, as on a real decode server
        while decode.has_work():
            for out in decode.step():
                tokens += out.new_token_ids
        assert tokens == expected
        assert graphs.runs[(1, 1)] == 9
        prefill.kv_pool.check_integrity(expect_used=0)
        decode.kv_pool.check_integrity(expect_used=0)
    finally:
        prefill_engine.shutdown()
        decode_engine.shutdown()


def test_cuda_graph_flags_reach_the_engine_config():
    from argparse import ArgumentParser

    from pdserve.engine.config import add_engine_arguments, engine_config_from_args

    parser = ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--disable-cuda-graph", "--cuda-graph-max-bs", "16"]))
    assert config.disable_cuda_graph and config.cuda_graph_max_bs == 16
    config = engine_config_from_args(parser.parse_args([]))
    assert not config.disable_cuda_graph and config.cuda_graph_max_bs == 64
    config.cuda_graph_max_bs = 0
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        config.validate()


def test_rows_wider_than_the_table_decode_eagerly():
    """A row whose context exceeds the block table's width is not padded into it: that step runs
    eagerly, and the output is unchanged."""
    eager, static = _engine(), _engine()
    try:
        rng = random.Random(5)
        prompts = [[rng.randrange(4, eager.core.vocab_size) for _ in range(n)] for n in (6, 30, 8, 9, 10, 11)]
        expected = _serve(eager.core, prompts)
        graphs = static.core.runner.enable_decode_graphs(max_bs=8, context_length=32)  # 8 pages of 4 tokens
        got = _serve(static.core, prompts)
        assert got == expected
        assert graphs.width == 8 and graphs.runs  # short batches still ran over the buffers
        assert graphs.declined > 0  # steps holding the 30-token row past 32 tokens did not
        static.core.kv_pool.check_integrity(expect_used=0)
    finally:
        eager.shutdown()
        static.shutdown()


def test_scratch_page_is_reserved_apart_from_pages_in_use():
    """The scratch page the runner holds (as every engine on CUDA does) is the engine's reservation:
    an idle engine reports no page in use, its capacity excludes the page and is exactly usable, and
    no request or holder can take or release it."""
    engine = Engine(None, page_size=PAGE_SIZE, max_total_tokens=64, chunked_prefill_size=48, disable_radix_cache=True)
    try:
        core, pool = engine.core, engine.core.kv_pool
        graphs = core.runner.enable_decode_graphs(max_bs=4, context_length=core.context_length)
        load = core.load()
        assert load["num_used_pages"] == 0 and load["num_total_pages"] == pool.num_pages - 1 == 15
        assert core.max_total_tokens == 60 and pool.num_used == 0 and pool.num_reserved == 1
        pool.check_integrity(expect_used=0)
        greedy = {"max_new_tokens": 20, "min_new_tokens": 20, "temperature": 0}
        out = engine.generate(input_ids=list(range(4, 44)), sampling_params=greedy)  # all 60 tokens of capacity
        assert len(out["output_ids"]) == 20 and graphs.runs
        with pytest.raises(RequestError, match=r"capacity \(max_total_tokens\) 60"):
            engine.generate(input_ids=list(range(4, 45)), sampling_params=greedy)
        with pytest.raises(PageRefError, match="reserves"):
            pool.ref([graphs.scratch_page])
        with pytest.raises(PageRefError, match="the engine reserves it"):
            pool.unref([graphs.scratch_page])
        pool.check_integrity(expect_used=0)
        assert core.load()["num_used_pages"] == 0 and pool.refcount(graphs.scratch_page) == 1
    finally:
        engine.shutdown()


def _meta_model_and_pool():
    """The tiny model and a KV pool on the ``meta`` device in bfloat16 (as on CUDA): any read of
    device data on the host there (``.item()``, ``.tolist()``, ``bool(tensor)``) raises."""
    import torch

    from pdserve.engine.kv_pool import KVPool
    from pdserve.models.llama import LlamaForCausalLM
    from pdserve.models.loader import load_model

    cfg = load_model().config
    meta = torch.device("meta")
    with meta:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.fuse_projections()
    with pytest.raises(RuntimeError, match="meta"):
        bool(torch.zeros(1, device=meta).any())  # the premise: a host read fails there
    return cfg, model, KVPool(64, 16, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, meta)


def test_captured_region_reads_nothing_back_to_the_host():
    """What a CUDA graph captures (``DecodeGraphs._run``: model, fixed-shape gather attention, LM head)
    must not read device data on the host (a sync, which capture forbids): every batch size and width
    runs on the meta device, through the same code as on a GPU (no native kernel off the CPU)."""
    from pdserve.engine.decode_graphs import DecodeGraphs

    cfg, model, pool = _meta_model_and_pool()
    graphs = DecodeGraphs(model, pool, pool.device, max_bs=8, context_length=cfg.max_position_embeddings,
                          capture=False)
    assert len(graphs.widths) > 1
    for width in graphs.widths:
        for bs in graphs.buckets:
            logits = graphs._run(bs, width)
            assert logits.shape == (bs, cfg.vocab_size) and logits.device == pool.device


def test_eager_step_reads_nothing_back_before_sampling():
    """The eager forward of a mixed batch (a decode row in padded gather groups, a prefill chunk over
    a cached prefix) queues its GPU work without waiting on it: it runs on the meta device too."""
    from pdserve.engine.model_runner import ExtendChunk, ForwardBatch, ModelRunner

    cfg, model, pool = _meta_model_and_pool()
    runner = ModelRunner(model, pool, pool.device)
    decode = Req("d", list(range(4, 40)), _greedy(4))
    decode.output_ids, decode.pages, decode.num_computed = [5], pool.alloc(3), 36
    prefill = Req("p", list(range(4, 60)), _greedy(4))
    prefill.pages = pool.alloc(4)
    result = runner.forward(ForwardBatch(decodes=[decode], extends=[ExtendChunk(prefill, 20, 36, needs_sample=True)]))
    assert result.decode_logits.shape == (1, cfg.vocab_size) and result.sample_logits["p"].shape == (cfg.vocab_size,)
