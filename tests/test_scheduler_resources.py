"""The scheduler's resources (issue 22): the running cap is a slot table every path that makes a
request runnable goes through (colocated admission, P/D page pre-allocation, sample forks), a
retraction drops the whole attempt (pages, progress, input logprobs), and every id a request will
use is reserved on arrival, so no two live requests or samples share one."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.engine.request import Req, RequestError, SamplingParams

GREEDY = {"temperature": 0}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params(**kw) -> SamplingParams:
    return SamplingParams.from_dict({**GREEDY, **kw})


def drive(core, check=None, limit: int = 2000) -> dict[str, list]:
    """Step ``core`` until it is idle; ``check`` runs after every step. Returns outputs by rid."""
    outputs: dict[str, list] = {}
    for _ in range(limit):
        if not core.has_work():
            break
        for out in core.step():
            outputs.setdefault(out.rid, []).append(out)
        if check is not None:
            check()
    assert not core.has_work(), "the scenario did not end"
    return outputs


def in_slots(scheduler) -> int:
    """Requests that hold KV for running: running ones and P/D ones whose KV is arriving."""
    return len(scheduler.running) + len(scheduler.awaiting_kv)


def test_decode_rank_honours_the_running_cap():
    """Case 1: a P/D decode rank with --max-running-requests 2 pre-allocated pages for (and then
    ran) six requests at once; now a third request waits for a slot before its pages."""
    core = Engine(None, page_size=4, max_total_tokens=512, max_running_requests=2, torch_threads=1).core
    scheduler = core.scheduler
    allocated: list[Req] = []
    scheduler.on_pages_allocated = allocated.append
    reqs = [Req(f"d{i}", [5 + i, 6, 7, 8, 9], params(max_new_tokens=4, min_new_tokens=4)) for i in range(6)]
    for req in reqs:
        core.validate(req)
        scheduler.add_prefilled_request(req)
        assert in_slots(scheduler) <= 2, f"{in_slots(scheduler)} requests hold KV with a cap of 2"
    peak = 0
    for _ in range(200):
        while allocated:  # the KV "arrives" at once: activate in allocation order
            scheduler.activate_prefilled(allocated.pop(0).rid, 11)
        peak = max(peak, in_slots(scheduler))
        assert len(scheduler.running) <= 2
        if not core.has_work() and not scheduler.awaiting_kv:
            break
        core.step()
    assert peak == 2
    assert all(req.output_ids and len(req.output_ids) == 4 for req in reqs), [r.output_ids for r in reqs]
    core.kv_pool.check_integrity(expect_used=0)


def test_parallel_samples_honour_the_running_cap():
    """Case 1, forks: n=4 with a cap of 2 ran four samples at once; now the samples beyond the cap
    wait for a slot, and all four still finish."""
    engine = Engine(None, page_size=4, max_total_tokens=512, max_running_requests=2, torch_threads=1)
    core = engine.core
    core.add_request(Req("p", [3, 4, 5, 6, 7, 8], params(max_new_tokens=5, min_new_tokens=5, n=4, temperature=1.0,
                                                         seed=1)))
    outputs = drive(core, check=lambda: _assert_cap(core.scheduler, 2))
    assert sorted(outputs) == ["p", "p.s1", "p.s2", "p.s3"]
    assert all(sum(len(o.new_token_ids) for o in outs) == 5 for outs in outputs.values())
    core.kv_pool.check_integrity(expect_used=0)


def _assert_cap(scheduler, cap: int) -> None:
    assert in_slots(scheduler) <= cap, f"{in_slots(scheduler)} running with a cap of {cap}"


def test_retraction_mid_prefill_reports_input_logprobs_once():
    """Case 2: a request retracted while its prompt was half prefilled reported the logprobs of
    the computed part twice (35 entries for a 28-token prompt here); now its fresh attempt counts
    them once, equal to an undisturbed run's."""
    prompt = [(7 * i + 3) % 200 + 1 for i in range(28)]
    lp = {"return_logprob": True, "logprob_start_len": 0}
    solo = Engine(None, page_size=4, max_total_tokens=512, chunked_prefill_size=8, torch_threads=1)
    expected = solo.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1, **GREEDY}, **lp)
    # 9 pages of 4 tokens: A (7-token prompt, 2 pages) decodes; B's 7 pages fill the pool, so A's
    # third page retracts B (the newest) after its first 8-token chunk
    core = Engine(None, page_size=4, max_total_tokens=36, chunked_prefill_size=8, num_reserved_decode_tokens=0,
                  disable_radix_cache=True, torch_threads=1).core
    core.add_request(Req("a", [9, 8, 7, 6, 5, 4, 3], params(max_new_tokens=6, min_new_tokens=6)))
    first = core.step()
    assert first and first[0].rid == "a"
    b = Req("b", list(prompt), params(max_new_tokens=1), return_logprob=True, logprob_start_len=0)
    core.add_request(b)
    outputs = drive(core)
    assert b.num_retractions == 1, "B was not retracted mid-prefill: nothing exercised"
    got = [lp for out in outputs["b"] if out.input_logprobs is not None for lp in out.input_logprobs.values]
    want = [value for value, _, _ in expected["meta_info"]["input_token_logprobs"]]
    assert len(got) == len(prompt) == len(want), f"{len(got)} input logprobs for a {len(prompt)}-token prompt"
    assert got[0] is None and want[0] is None
    assert max(abs(g - w) for g, w in zip(got[1:], want[1:])) < 1e-4
    core.kv_pool.check_integrity(expect_used=0)


def test_a_rid_equal_to_a_live_sample_id_is_refused():
    """Case 3: a request named ``x.s1`` beside ``x`` with n=2 left two live ``x.s1`` in the
    scheduler (one client got the other's tokens). The ids of a request and of its samples are
    reserved together: whichever comes second is refused naming the rid, the first is unharmed."""
    engine = Engine(None, page_size=4, max_total_tokens=512, torch_threads=1)
    core = engine.core
    core.add_request(Req("x.s1", [3, 4, 5], params(max_new_tokens=4, min_new_tokens=4)))
    with pytest.raises(RequestError, match=r"rid 'x'.*'x\.s1'"):
        core.add_request(Req("x", [3, 4, 5], params(max_new_tokens=4, n=2, temperature=1.0, seed=3)))
    core.add_request(Req("y", [3, 4, 5], params(max_new_tokens=4, n=2, temperature=1.0, seed=3)))
    with pytest.raises(RequestError, match=r"rid 'y\.s1'"):
        core.add_request(Req("y.s1", [3, 4, 5], params(max_new_tokens=4)))
    outputs = drive(core)
    assert sorted(outputs) == ["x.s1", "y", "y.s1"]
    assert all(sum(len(o.new_token_ids) for o in outs) == 4 for outs in outputs.values())
    assert sum(o.finished for outs in outputs.values() for o in outs) == 3
    core.kv_pool.check_integrity(expect_used=0)
