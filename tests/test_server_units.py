"""Server pieces without processes: dispatch policies and the wire format."""

from __future__ import annotations

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.request import SamplingParams, StepOutput, TokenLogprobs
from pdserve.server import messages as msg
from pdserve.server.dispatch import NoRankAvailable, RankView, make_policy


def views(*loads: tuple[int, int], dead: tuple[int, ...] = ()) -> list[RankView]:
    return [RankView(i, i not in dead, reqs, tokens) for i, (reqs, tokens) in enumerate(loads)]


def test_round_robin_skips_dead_ranks():
    policy = make_policy("round_robin", 3)
    assert [policy.select(views((0, 0), (0, 0), (0, 0))) for _ in range(4)] == [0, 1, 2, 0]
    assert [policy.select(views((0, 0), (0, 0), (0, 0), dead=(1,))) for _ in range(3)] == [2, 0, 2]
    with pytest.raises(NoRankAvailable):
        policy.select(views((0, 0), (0, 0), (0, 0), dead=(0, 1, 2)))


def test_shortest_queue_and_minimum_tokens():
    assert make_policy("shortest_queue", 3).select(views((2, 10), (1, 900), (3, 5))) == 1
    assert make_policy("minimum_tokens", 3).select(views((2, 10), (1, 900), (3, 5))) == 2
    policy = make_policy("shortest_queue", 2)
    assert {policy.select(views((0, 0), (0, 0))) for _ in range(2)} == {0, 1}  # ties rotate


def test_follow_bootstrap_room():
    policy = make_policy("follow_bootstrap_room", 4)
    assert policy.select(views(*[(0, 0)] * 4), bootstrap_room=5470424843464133002) == 5470424843464133002 % 4
    assert [policy.select(views(*[(0, 0)] * 4)) for _ in range(3)] == [0, 1, 2]  # no room: round robin


def test_unknown_policy():
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random", 2)


def test_wire_roundtrip():
    req = msg.GenerateReq(
        rid="r", input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=3, stop=["x"]), dp_rank=1,
        bootstrap_host="127.0.0.1", bootstrap_port=None, bootstrap_room=2**63 - 1,
    )
    assert msg.decode_to_worker(msg.encode(req)) == req
    out = StepOutput(
        rid="r", new_token_ids=[5], finished=True, finish_reason={"type": "stop", "matched": "x"},
        output_logprobs=TokenLogprobs([5], [-0.5], [[(5, -0.5), (6, -1.0)]]),
        input_logprobs=TokenLogprobs([1, 2], [None, -2.0]),
    )
    batch = msg.OutputBatch(0, [out], msg.RankLoad(num_reqs=1))
    assert msg.decode_from_worker(msg.encode(batch)) == batch
    spec = msg.WorkerSpec(0, 1, EngineConfig(page_size=4), "ipc://a", "ipc://b", 1)
    assert msg.decode_spec(msg.encode_spec(spec)) == spec
