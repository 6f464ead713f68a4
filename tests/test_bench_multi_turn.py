"""The ``multi-turn`` serving dataset and the driver's sequential turns (no server needed)."""

from __future__ import annotations

import argparse

import pytest

from pdserve.bench.datasets import BenchRequest, DatasetError, sample_multi_turn
from pdserve.bench.serving import BenchmarkError, _chains, add_arguments, config_from_args
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_model_path())


def test_each_turn_extends_the_previous_one(tokenizer):
    requests = sample_multi_turn(tokenizer, num_conversations=5, turns_min=4, turns_max=8, system_prompt_len=40,
                                 question_len=6, output_len=5, seed=3)
    by_conv: dict[int, list[BenchRequest]] = {}
    for r in requests:
        by_conv.setdefault(r.conversation, []).append(r)
    assert sorted(by_conv) == list(range(5))
    assert len({len(turns) for turns in by_conv.values()}) > 1  # lengths vary within [4, 8]
    for turns in by_conv.values():
        assert 4 <= len(turns) <= 8 and [t.turn for t in turns] == list(range(len(turns)))
        assert turns[0].prompt_len == 46
        for prev, cur in zip(turns, turns[1:]):
            assert cur.prompt_ids[:prev.prompt_len] == prev.prompt_ids
            assert cur.prompt.startswith(prev.prompt)
            assert cur.prompt_len == prev.prompt_len + 5 + 6
    again = sample_multi_turn(tokenizer, 5, 4, 8, 40, 6, 5, seed=3)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in requests]


def test_driver_chains_turns_of_a_conversation():
    reqs = [BenchRequest("a", [1], 1, conversation=1, turn=1), BenchRequest("b", [1], 1),
            BenchRequest("c", [1], 1, conversation=1, turn=0), BenchRequest("d", [1], 1, conversation=0)]
    assert _chains(reqs) == [[2, 0], [1], [3]]


@pytest.mark.parametrize("flags, field", [
    (["--mt-num-conversations", "0"], "--mt-num-conversations"),
    (["--mt-turns-min", "-1"], "--mt-turns-min"),
    (["--mt-turns-min", "5", "--mt-turns-max", "4"], "--mt-turns-max"),
    (["--mt-output-len", "0"], "--mt-output-len"),
])
def test_bad_multi_turn_knobs_name_the_flag(tokenizer, flags, field):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--base-url", "http://127.0.0.1:1", "--dataset", "multi-turn",
                                                 *flags]))
    from pdserve.bench.serving import _build_requests

    with pytest.raises(BenchmarkError, match=field):
        _build_requests(config, tokenizer)
    with pytest.raises(DatasetError):
        sample_multi_turn(tokenizer, 1, 2, 1, 1, 1, 1, 0)
