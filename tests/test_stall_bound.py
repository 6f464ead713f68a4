"""The wait of a request after its first token is bounded (issue 9): under KV pressure a request
retracted after its first token gets priority after ``--stall-priority-after`` (running requests
that waited less are retracted for it, each at most twice), and fails alone with a named error if
it cannot run again within ``--stall-timeout``. A fake clock makes the scenarios deterministic."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.engine.request import Req, SamplingParams
from pdserve.engine.scheduler import MAX_PRIORITY_PREEMPTIONS

STEP_S = 0.1  # fake seconds per engine step
NEW_TOKENS = 100
PROMPT_TOKENS = 40
# 64 pages of 4 tokens: three 40-token prompts fit, their growth to 140 tokens each does not
POOL = {"page_size": 4, "max_total_tokens": 256, "num_reserved_decode_tokens": 4, "torch_threads": 1}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prompts() -> list[list[int]]:
    rng = random.Random(9)
    return [[rng.randrange(1, 2000) for _ in range(PROMPT_TOKENS)] for _ in range(3)]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Each prompt's greedy output with room to spare (no retraction)."""
    threads = torch.get_num_threads()
    engine = Engine(None, page_size=4, max_total_tokens=2048, torch_threads=1)
    params = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0}
    out = [engine.generate(input_ids=ids, sampling_params=params)["output_ids"] for ids in prompts()]
    torch.set_num_threads(threads)
    return out


def run(priority_s: float, timeout_s: float):
    """Three requests on a pool too small for all of them to finish together; one engine step per
    fake 0.1 s. Returns the scheduler, each request's (time, tokens) outputs and final output."""
    engine = Engine(None, stall_priority_s=priority_s, stall_timeout_s=timeout_s, **POOL)
    scheduler = engine.core.scheduler
    clock = scheduler.clock = FakeClock()
    params = SamplingParams.from_dict({"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0})
    reqs = [Req(f"r{i}", ids, params) for i, ids in enumerate(prompts())]
    for req in reqs:
        engine.core.add_request(req)
    times: dict[str, list[float]] = {req.rid: [] for req in reqs}
    tokens: dict[str, list[int]] = {req.rid: [] for req in reqs}
    finals = {}
    for _ in range(5000):
        if not engine.core.has_work():
            break
        for out in engine.core.step():
            if out.new_token_ids:
                times[out.rid].append(clock.now)
                tokens[out.rid] += out.new_token_ids
            if out.finished:
                finals[out.rid] = out
        clock.now += STEP_S
    assert not engine.core.has_work(), "the scenario did not end"
    engine.core.kv_pool.check_integrity(expect_used=0)
    return engine.core, reqs, times, tokens, finals


def max_gap(stamps: list[float]) -> float:
    return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)


def test_retracted_request_gets_priority_within_the_bound(reference):
    """Without the bound the request retracted first waits until an older one finishes (5.7
    fake seconds here); with priority after 2 s no request waits much longer than that between
    two tokens, outputs stay exact, and nobody is preempted more than twice."""
    priority_s = 2.0
    core, reqs, times, tokens, finals = run(priority_s, timeout_s=60.0)
    scheduler = core.scheduler
    assert scheduler.num_retractions > 0, "the pool never ran dry: nothing exercised"
    assert scheduler.num_preemptions > 0
    assert scheduler.num_stall_timeouts == 0
    for i, req in enumerate(reqs):
        assert finals[req.rid].finish_reason["type"] == "length", finals[req.rid].finish_reason
        assert tokens[req.rid] == reference[i], f"{req.rid}: recomputation changed the output"
        assert req.num_preempted <= MAX_PRIORITY_PREEMPTIONS
    gaps = {rid: max_gap(stamps) for rid, stamps in times.items()}
    # priority is applied at the first step after the bound; the recompute takes one more step
    assert max(gaps.values()) <= priority_s + 4 * STEP_S, gaps
    _, _, unbounded_times, _, _ = run(priority_s=1000.0, timeout_s=1000.0)  # the same scenario, no priority
    unbounded = max(max_gap(stamps) for stamps in unbounded_times.values())
    print(f"\nlongest gap between two tokens of one request: {max(gaps.values()):.1f} fake s with priority after "
          f"{priority_s:g} s, {unbounded:.1f} fake s without; {scheduler.num_preemptions} priority preemptions")
    assert unbounded > max(gaps.values()) + 1.0, "the scenario no longer stalls without priority: nothing is tested"
    load = core.load()
    assert (load["num_preemptions"], load["num_stall_timeouts"]) == (scheduler.num_preemptions, 0)


def test_request_that_cannot_run_again_fails_alone_with_a_named_error(reference):
    """Priority disabled in effect (1000 s) and a 3 s hard bound: the retracted requests fail with
    an error naming the request and the flag; the one that kept running finishes exactly."""
    core, reqs, times, tokens, finals = run(priority_s=1000.0, timeout_s=3.0)
    scheduler = core.scheduler
    failed = [r for r in reqs if finals[r.rid].finish_reason["type"] == "abort"]
    assert failed, {r.rid: finals[r.rid].finish_reason for r in reqs}
    for req in failed:
        reason = finals[req.rid].finish_reason
        assert f"request {req.rid} was retracted under KV pressure" in reason["message"]
        assert "--stall-timeout" in reason["message"] and reason["status_code"] == 503
        assert times[req.rid], f"{req.rid} failed before its first token: not the case under test"
    assert scheduler.num_stall_timeouts == len(failed)
    survivors = [i for i, r in enumerate(reqs) if r not in failed]
    assert survivors
    for i in survivors:
        assert tokens[reqs[i].rid] == reference[i]
    load = core.load()
    assert (load["num_preemptions"], load["num_stall_timeouts"]) == (0, len(failed))


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_stall_flags_are_validated(value):
    from pdserve.engine.config import EngineConfig

    for name in ("stall_priority_s", "stall_timeout_s"):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: value}).validate()


def test_preemptions_and_stall_timeouts_are_exported():
    """The worker's counters travel in ``RankLoad`` to ``/get_load`` and to ``/metrics``."""
    from pdserve.server.messages import RankLoad
    from pdserve.server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.set_load(1, RankLoad(num_preemptions=3, num_stall_timeouts=2))
    text = metrics.render().decode()
    assert 'pdserve:num_preemptions{dp_rank="1",model_name="m"} 3.0' in text
    assert 'pdserve:num_stall_timeouts{dp_rank="1",model_name="m"} 2.0' in text


def test_a_rank_whose_stalled_requests_cannot_run_blocks_instead_of_spinning():
    """Two requests retracted after their first tokens, and every free page held elsewhere (as a
    transfer would): nothing can make room. Once their priority was tried the rank is not runnable
    (its worker blocks) until their hard bound, which then fails both alone."""
    engine = Engine(None, stall_priority_s=2.0, stall_timeout_s=10.0, disable_radix_cache=True, **POOL)
    core, scheduler, pool = engine.core, engine.core.scheduler, engine.core.kv_pool
    clock = scheduler.clock = FakeClock()
    rng = random.Random(10)
    params = SamplingParams.from_dict({"max_new_tokens": 100, "min_new_tokens": 100, "temperature": 0})
    reqs = [Req(rid, [rng.randrange(1, 2000) for _ in range(20)], params) for rid in ("a", "b")]
    for req in reqs:
        core.add_request(req)
    for _ in range(5):
        core.step()
        clock.now += STEP_S
    assert all(len(req.output_ids) >= 3 for req in reqs)
    for req in reqs:
        scheduler._retract(req)
    elsewhere = pool.alloc(pool.num_free)
    core.step()
    assert not core.runnable()
    clock.now += 2.5  # past the priority bound: one step tries it
    assert core.runnable()
    core.step()
    assert not core.runnable(), "a rank with nothing it can do must block, not step again"
    clock.now += 5.0  # still under the hard bound
    assert not core.runnable()
    clock.now += 5.0
    assert core.runnable()
    outputs = {out.rid: out for out in core.step()}
    for req in reqs:
        assert "--stall-timeout" in outputs[req.rid].finish_reason["message"]
    assert scheduler.num_stall_timeouts == 2 and scheduler.num_preemptions == 0
    pool.unref(elsewhere)
    pool.check_integrity(expect_used=0)
