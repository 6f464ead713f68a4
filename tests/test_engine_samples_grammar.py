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
