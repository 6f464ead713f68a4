"""The engine's parallel sampling (KV fork) and grammar masks, offline (no server)."""

from __future__ import annotations

import json
import re

import pytest

from pdserve import Engine
from pdserve.engine.grammar import GrammarError


@pytest.fixture(scope="module")
def engine():
    eng = Engine(max_total_tokens=2048, page_size=16, chunked_prefill_size=64)
    yield eng
    eng.shutdown()


def test_samples_match_single_requests_with_next_seeds(engine):
    prompt = "Once upon a time, in a small village far away"  # more than one page of KV is copied
    outs = engine.generate(prompt, sampling_params={"max_new_tokens": 8, "n": 4, "seed": 30})
    assert len(outs) == 4 and len({o["text"] for o in outs}) == 4
    for i, out in enumerate(outs):
        single = engine.generate(prompt, sampling_params={"max_new_tokens": 8, "seed": 30 + i})
        assert single["output_ids"] == out["output_ids"], i
    engine.core.kv_pool.check_integrity(0)
    assert engine.core.scheduler.num_requests() == 0


def test_samples_without_free_pages_prefill_on_their_own():
    small = Engine(max_total_tokens=64, page_size=16, chunked_prefill_size=64)
    try:
        prompt = "Once upon a time, in a small village"
        outs = small.generate(prompt, sampling_params={"max_new_tokens": 10, "n": 3, "seed": 2})
        for i, out in enumerate(outs):
            assert out["meta_info"]["completion_tokens"] == 10
            single = small.generate(prompt, sampling_params={"max_new_tokens": 10, "seed": 2 + i})
            assert single["output_ids"] == out["output_ids"]
        small.core.kv_pool.check_integrity(0)
    finally:
        small.shutdown()


def test_grammar_masks_each_sample(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    outs = engine.generate(["Hi", "def f"], sampling_params={
        "max_new_tokens": 40, "n": 3, "seed": 1, "json_schema": json.dumps(schema)})
    for out in outs:
        value = json.loads(out["text"])
        assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    out = engine.generate("Hi", sampling_params={"max_new_tokens": 20, "regex": "(ab|cd)[0-9]", "min_new_tokens": 10})
    assert re.fullmatch("(ab|cd)[0-9]", out["text"]), out  # min_new_tokens cannot outvote a complete grammar
    engine.core.kv_pool.check_integrity(0)


@pytest.mark.parametrize("params", [{"regex": "("}, {"json_schema": "[1"}, {"ebnf": "root ::= ("},
                                    {"regex": "[a&&b]"}, {"regex": "a", "json_schema": "{}"}])
def test_bad_grammar_raises_naming_field(engine, params):
    with pytest.raises(GrammarError) as err:
        engine.generate("Hi", sampling_params=params)
    assert err.value.field in params


def test_batched_masks_match_each_matchers_own_mask():
    """One batched llguidance call + one vectorized op gives each row exactly its own matcher's mask
    (a dead matcher's too); unconstrained rows are untouched; a row whose allowed tokens were all
    banned before gets them back, equally likely. The batched path really runs: a fallback to row
    by row (as when ``executor()`` raised NameError on ``torch``) fails the test."""
    import torch

    from pdserve.engine import grammar
    from pdserve.engine.grammar import GrammarCompiler, apply_grammar_masks
    from pdserve.engine.request import Req, SamplingParams
    from pdserve.models import tiny
    from pdserve.models.tokenizer import Tokenizer

    tok = Tokenizer(tiny.default_model_path())
    vocab = tiny.VOCAB_SIZE
    compiler = GrammarCompiler(tok.to_json(), vocab, [tok.eos_token_id or 0])
    params = [SamplingParams(regex="[0-9]{2}:[0-9]{2}"), SamplingParams(),
              SamplingParams(json_schema=json.dumps({"type": "array", "items": {"type": "integer"}})),
              SamplingParams(regex="(ab)+"), SamplingParams(regex="x[0-9]")]
    reqs = [Req(rid=str(i), input_ids=[1], params=p, grammar=compiler.matcher(p)) for i, p in enumerate(params)]
    assert not reqs[4].grammar.consume_token(own_mask(reqs[4].grammar, vocab).index(False))  # a dead matcher
    masks = {row: torch.tensor(own_mask(reqs[row].grammar, vocab)) for row in (0, 2, 3, 4)}
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(0))
    logits[3] = float("-inf")  # every token banned before the grammar: the grammar's tokens come back
    before = logits.clone()
    fallbacks = grammar.batch_fallbacks
    apply_grammar_masks(logits, reqs)
    assert grammar.batch_fallbacks == fallbacks, "the batched mask call failed and fell back to row by row"
    assert grammar._executor is not None  # the batch went through llguidance's executor
    for row, allowed in masks.items():
        assert allowed.any() and not allowed.all()
        assert torch.isinf(logits[row][~allowed]).all()
        want = torch.zeros(vocab)[allowed] if row == 3 else before[row][allowed]
        assert torch.equal(logits[row][allowed], want), row
    assert torch.equal(logits[1], before[1])


def own_mask(matcher, vocab: int) -> list[bool]:
    """The matcher's mask computed on its own (row by row, llguidance's single-matcher call)."""
    import numpy as np

    words = (vocab + 31) // 32
    bits = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
    return [bool(b) for b in np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]]
