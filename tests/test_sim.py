"""Simulated compute (pdserve.sim): cost-model unit checks, bad settings, and real sim servers.

The fleet is a prefill server (DP 2) and a decode server (DP 3) simulating an H100 with the
embedded tiny model's config (so text works), behind ``pdserve router`` and sglang-router; a
second pair injects faults; a third (DP 8 + DP 8) shows a 16-rank fleet starts and serves.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from pdserve.bench.cluster import Cluster, post_json
from pdserve.disagg.messages import Pages
from pdserve.sim.cost_model import StepShape
from pdserve.sim.faults import FaultPlan
from pdserve.sim.hardware import SimConfigError, get_hardware
from pdserve.sim.model_shape import ModelShape
from pdserve.sim.roofline import RooflineCost
from pdserve.sim.transfer import LinkSpec, SharedLink, SimReceiver, SimSender, register_link
from tests.server_harness import REPO_ROOT, wait_until

MODELS = REPO_ROOT / "benchmarks" / "sim_models"
SIM = ["--simulate", "H100-SXM", "--max-total-tokens", "8192", "--page-size", "16"]
FAULTS = "prefill=0.25,transfer=0.25,decode=0.25"


# ---------------------------------------------------------------------- units
def llama8b() -> ModelShape:
    return ModelShape.from_folder(MODELS / "llama-3.1-8b")


def test_llama8b_shape_matches_published_sizes():
    s = llama8b()
    assert abs(s.num_params - 8.03e9) < 0.01e9
    assert s.kv_bytes_per_token == 128 * 1024  # 2 * 32 layers * 8 kv heads * 128 * 2 bytes
    assert ModelShape.from_folder(MODELS / "llama-3.1-70b").kv_bytes_per_token == 320 * 1024


def test_roofline_decode_floor_and_batch1_step_by_hand():
    cost = RooflineCost(llama8b(), get_hardware("H100-SXM"))
    assert cost.decode_floor_seconds() == pytest.approx(16.06e9 / 3.35e12, rel=0.002)  # ~4.79 ms
    weights = 16.0605e9
    by_hand = (weights + 1 * 131072) / (3.35e12 * 0.77) + 126e-6 + 4e-6
    assert cost.step_seconds(StepShape([1])) == pytest.approx(by_hand, rel=0.001)
    h200 = RooflineCost(llama8b(), get_hardware("H200"))
    assert h200.decode_floor_seconds() == pytest.approx(16.06e9 / 4.8e12, rel=0.002)  # ~3.35 ms


def test_roofline_prefill_is_compute_bound_and_tp_divides():
    shape = llama8b()
    one = RooflineCost(shape, get_hardware("H100-SXM"))
    flops = 2 * shape.matmul_params * 4096 + 4 * 32 * 4096 * 4096 * (4096 + 1) / 2
    p = one.parts(StepShape(extends=[(0, 4096)]))
    assert p["compute"] == pytest.approx(flops / (989e12 * 0.45), rel=1e-6) and p["compute"] > p["memory"]
    four = RooflineCost(shape, get_hardware("H100-SXM"), tp_size=4)
    q = four.parts(StepShape(extends=[(0, 4096)]))
    assert q["compute"] == pytest.approx(p["compute"] / 4) and q["allreduce"] > 0 == p["allreduce"]
    assert four.kv_capacity_tokens() > 4 * one.kv_capacity_tokens()


@pytest.mark.parametrize("spec, error", [
    ("B200-XL", "unknown hardware 'B200-XL'"),
    ("profile:/nonexistent/p.json", "cannot read the profile"),
])
def test_bad_simulate_values_name_the_value(spec, error):
    from pdserve.sim.cost_model import make_cost_model

    with pytest.raises(SimConfigError, match=error):
        make_cost_model(spec, llama8b())


def test_malformed_profile_and_model_too_big(tmp_path):
    from pdserve.sim.cost_model import make_cost_model

    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(SimConfigError, match="not JSON"):
        make_cost_model(f"profile:{bad}", llama8b())
    bad.write_text(json.dumps({"format": "pdserve-step-profile/1", "coefficients": {"step": -1}}))
    with pytest.raises(SimConfigError, match="coefficients"):
        make_cost_model(f"profile:{bad}", llama8b())
    seventy = ModelShape.from_folder(MODELS / "llama-3.1-70b")
    with pytest.raises(SimConfigError, match="do not fit 1 x H100-SXM"):
        RooflineCost(seventy, get_hardware("H100-SXM"))
    RooflineCost(seventy, get_hardware("H100-SXM"), tp_size=4)
    with pytest.raises(SimConfigError, match="no config.json"):
        ModelShape.from_folder(tmp_path)


def test_shared_link_splits_bandwidth_between_concurrent_transfers():
    link = SharedLink(1e9)  # 1 GB/s: 50 MB alone takes 50 ms, two at once 100 ms each
    start = time.monotonic()
    link.transfer(50e6)
    alone = time.monotonic() - start
    done: list[float] = []
    threads = [threading.Thread(target=lambda: (link.transfer(50e6), done.append(time.monotonic()))) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = max(done) - start
    assert 0.045 < alone < 0.09 and 0.095 < both < 0.16, (alone, both)


LINK_BPS = 1e9  # every simulated NIC in the transfer tests: 1 GB/s, no setup latency
PAGES, PAGE_TOKENS = 10, 16
PAGE_BYTES = 312_500  # per token: a job of 10 pages of 16 tokens is 50 MB, 50 ms alone on one link


def sim_pool():
    import torch

    from pdserve.engine.kv_pool import KVPool

    pool = KVPool(64, PAGE_TOKENS, 1, 1, 1, torch.float32, "cpu", storage=False)
    register_link(pool, LinkSpec(LINK_BPS, 0.0, PAGE_BYTES))
    return pool


def transfer_times(pairs: list[tuple[int, int]]) -> list[float]:
    """Start one 50 MB job per (prefill rank, decode rank) pair at once, over real sockets between
    real sim senders and receivers; the seconds until each job's pages are written and its sender
    is done (what the decode side waits for before the room's Status)."""
    senders_n = max(p for p, _ in pairs) + 1
    receivers_n = max(d for _, d in pairs) + 1
    written: dict[int, float] = {}
    sent: dict[int, float] = {}

    def on_event(event: object) -> None:
        if isinstance(event, Pages):
            written.setdefault(event.room, time.monotonic())

    receivers = [SimReceiver(sim_pool(), on_event, "127.0.0.1", 5.0) for _ in range(receivers_n)]
    senders = [SimSender(sim_pool(), lambda r: sent.setdefault(r.room, r.done_at), 5.0) for _ in range(senders_n)]
    try:
        for room, (_, d) in enumerate(pairs):
            receivers[d].open_room(room, list(range(PAGES * room, PAGES * (room + 1))))
        start = time.monotonic()
        for room, (p, d) in enumerate(pairs):
            pages = list(range(PAGES * room, PAGES * (room + 1)))
            senders[p].send_pages(receivers[d].info(), room, pages[:], pages)
        wait_until(lambda: len(written) == len(sent) == len(pairs), timeout=5)
        return [max(written[room], sent[room]) - start for room in range(len(pairs))]
    finally:
        for x in senders + receivers:
            x.close()


@pytest.mark.parametrize("pairs, expected", [
    ([(0, 0)], 0.05),  # alone: 50 MB / 1 GB/s
    ([(0, 0), (1, 1)], 0.05),  # disjoint links: no contention
    ([(0, 0), (0, 1)], 0.10),  # one prefill rank feeding two decode ranks: its NIC is split in two
    ([(0, 0), (1, 0)], 0.10),  # two prefill ranks into one decode rank: the decode NIC is split in two
    ([(0, 0), (1, 0), (2, 0)], 0.15),  # three into one: a third each
])
def test_transfer_contention_on_prefill_and_decode_links(pairs, expected):
    times = transfer_times(pairs)
    assert all(expected * 0.9 < t < expected + 0.06 for t in times), (expected, times)


def test_fault_plan_parsing_and_selection():
    plan = FaultPlan.parse("prefill=0.5,slow_rank=2:4,transfer_slowdown=3")
    assert plan.rank_slowdown(2) == 4 and plan.rank_slowdown(0) == 1 and plan.transfer_slowdown == 3
    hits = sum(plan.hits("prefill", f"r{i}") for i in range(1000))
    assert 400 < hits < 600 and not any(plan.hits("decode", f"r{i}") for i in range(100))
    for bad in ("prefill=2", "slow_rank=x", "nonsense=1", "prefill"):
        with pytest.raises(SimConfigError, match="--inject-faults"):
            FaultPlan.parse(bad)


# ---------------------------------------------------------------------- servers
def loads(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/get_load", timeout=10) as r:
        return json.load(r)


def used_pages(*procs) -> int:
    return sum(rank["num_used_pages"] for p in procs for rank in loads(p.url))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("sim"), log_level="warning") as c:
        p = c.server("prefill", "prefill", dp_size=2, transfer_backend="sim", extra=SIM)
        d = c.server("decode", "decode", dp_size=3, transfer_backend="sim", extra=SIM)
        fp = c.server("fprefill", "prefill", dp_size=1, transfer_backend="sim", extra=[*SIM, "--inject-faults", FAULTS])
        fd = c.server("fdecode", "decode", dp_size=1, transfer_backend="sim", extra=[*SIM, "--inject-faults", FAULTS])
        c.wait_healthy([p, d, fp, fd], timeout=120)
        router = c.pdserve_router("router", [p], [d], args=["--policy", "random"])
        sgl = c.sglang_router("sglang", [p], [d])
        c.wait_serving(router)
        c.wait_serving(sgl)
        yield {"prefill": p, "decode": d, "router": router, "sglang": sgl, "fprefill": fp, "fdecode": fd}


def test_text_needs_a_tokenizer_only_when_there_is_none(tmp_path):
    """Startup errors name the value; a config-only folder serves input_ids and answers text with 400."""
    with Cluster(tmp_path) as c:
        s = c.server("bad", dp_size=1, extra=["--simulate", "H100-SXM", "--model-path", str(MODELS / "llama-3.1-70b")])
        assert s.popen.wait(timeout=60) != 0 and "do not fit 1 x H100-SXM" in s.log_tail()
        s = c.server("ok", dp_size=2, extra=["--simulate", "H200", "--model-path", str(MODELS / "llama-3.1-8b")])
        c.wait_healthy([s], timeout=90)
        status, body = post_json(s.url + "/generate", {"text": "hi"})
        assert status == 400 and "send input_ids" in json.dumps(body)
        status, body = post_json(s.url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {
            "max_new_tokens": 30, "stop": " 7"}})
        assert status == 200 and body["meta_info"]["completion_tokens"] <= 30
        status, body = post_json(s.url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 50}})
        assert status == 200 and body["meta_info"]["completion_tokens"] == 50
        # 50 decode steps of Llama-3.1-8B on an H200 (~4.5 ms each by the roofline) take real time
        assert body["meta_info"]["e2e_latency"] > 50 * 0.004, body["meta_info"]


def test_every_rank_pair_answers_through_pdserve_router(fleet):
    pairs = set()
    for n in range(60):
        status, body = post_json(fleet["router"].url + "/generate", {
            "input_ids": [5 + n, 6, 7, 8], "sampling_params": {"max_new_tokens": 4}})
        assert status == 200, body
        assert len(body["output_ids"]) == 4
        pairs.add((body["meta_info"]["prefill_dp_rank"], body["meta_info"]["decode_dp_rank"]))
        if len(pairs) == 6:
            break
    assert pairs == {(i, j) for i in range(2) for j in range(3)}
    assert wait_until(lambda: used_pages(fleet["prefill"], fleet["decode"]) == 0, 10)


def test_sim_fronts_never_load_torch(fleet):
    """A sim server's front (HTTP, validation, P/D bootstrap service) stays torch-free while serving:
    torch costs ~3 s of CPU and ~200 MB per process, the bulk of a large sim fleet's start-up."""
    post_json(fleet["router"].url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    for name in ("prefill", "decode"):
        maps = Path(f"/proc/{fleet[name].pid}/maps").read_text()
        assert "libtorch" not in maps, f"the {name} front loaded torch"


def test_sglang_router_drives_the_sim_fleet(fleet):
    async def main():
        async with httpx.AsyncClient(base_url=fleet["sglang"].url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/generate", json={
                "text": f"request {k}", "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}})
                for k in range(24)))
            return [r.status_code for r in rs], [r.json() for r in rs]

    codes, bodies = asyncio.run(main())
    assert codes == [200] * 24, bodies
    assert all(b["meta_info"]["completion_tokens"] == 6 for b in bodies)
    assert wait_until(lambda: used_pages(fleet["prefill"], fleet["decode"]) == 0, 10)


def halves(prefill, room: int, i: int, j: int, rid: str, new: int = 4) -> tuple[dict, dict]:
    common = {"input_ids": [3, 1, 4, 1, 5, 9, 2, 6], "sampling_params": {"max_new_tokens": new}, "rid": rid,
              "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": room}
    return {**common, "data_parallel_rank": i}, {**common, "data_parallel_rank": j, "disagg_prefill_dp_rank": i}


def send_pair(prefill, decode, room, i, j, rid, first: str, gap: float = 0.3) -> tuple[httpx.Response, httpx.Response]:
    p_body, d_body = halves(prefill, room, i, j, rid)

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            async def late(url, body):
                await asyncio.sleep(gap)
                return await c.post(url, json=body)

            if first == "prefill":
                return await asyncio.gather(c.post(prefill.url + "/generate", json=p_body),
                                            late(decode.url + "/generate", d_body))
            return await asyncio.gather(late(prefill.url + "/generate", p_body),
                                        c.post(decode.url + "/generate", json=d_body))

    return asyncio.run(main())


@pytest.mark.parametrize("first", ["prefill", "decode"])
def test_both_arrival_orders_every_pair(fleet, first):
    rng = random.Random(first)
    for i in range(2):
        for j in range(3):
            p, d = send_pair(fleet["prefill"], fleet["decode"], rng.randrange(2**62), i, j, f"{first}-{i}-{j}", first)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
            meta = d.json()["meta_info"]
            assert (meta["prefill_dp_rank"], meta["decode_dp_rank"]) == (i, j)
            assert len(d.json()["output_ids"]) == 4 and p.json()["output_ids"] == d.json()["output_ids"][:1]
            assert meta["kv_transfer_bytes"] == p.json()["meta_info"]["kv_transfer_bytes"] > 0  # modelled bytes
    assert wait_until(lambda: used_pages(fleet["prefill"], fleet["decode"]) == 0, 10)


def pick(point: str, rng: random.Random) -> tuple[int, str]:
    """A (room, rid) that fails at ``point`` and nowhere else under FAULTS."""
    plan = FaultPlan.parse(FAULTS)
    while True:
        room, rid = rng.randrange(2**62), f"f{rng.randrange(10**9)}"
        hit = {"prefill": plan.hits("prefill", rid), "transfer": plan.hits("transfer", room),
               "decode": plan.hits("decode", rid)}
        if hit[point] and sum(hit.values()) == 1:
            return room, rid


@pytest.mark.parametrize("point", ["prefill", "transfer", "decode", "none"])
def test_injected_faults_give_the_documented_status_and_free_pages(fleet, point):
    rng = random.Random(point)
    if point == "none":
        plan = FaultPlan.parse(FAULTS)
        room, rid = next((r, f"ok{r}") for r in range(10**6) if not (plan.hits("transfer", r) or plan.hits(
            "prefill", f"ok{r}") or plan.hits("decode", f"ok{r}")))
    else:
        room, rid = pick(point, rng)
    p, d = send_pair(fleet["fprefill"], fleet["fdecode"], room, 0, 0, rid, "decode", gap=0.1)
    if point == "none":
        assert p.status_code == d.status_code == 200
    elif point == "decode":  # after the first token: the request ends with the named abort
        assert d.status_code in (200, 500, 503), d.text
        assert "injected fault: decode failed" in d.text
    else:  # before the first token: 503 (routers retry), naming the cause
        assert d.status_code == 503, d.text
        assert f"injected fault: {point}" in d.text or "prefill" in d.text, d.text
    assert wait_until(lambda: used_pages(fleet["fprefill"], fleet["fdecode"]) == 0, 15), (
        loads(fleet["fprefill"].url), loads(fleet["fdecode"].url))


def test_sixteen_rank_fleet_starts_and_serves_within_a_minute(tmp_path):
    start = time.monotonic()
    with Cluster(tmp_path) as c:
        model = ["--model-path", str(MODELS / "llama-3.1-8b")]
        p = c.server("p8", "prefill", dp_size=8, transfer_backend="sim", extra=["--simulate", "H100-SXM", *model])
        d = c.server("d8", "decode", dp_size=8, transfer_backend="sim", extra=["--simulate", "H100-SXM", *model])
        c.wait_healthy([p, d], timeout=60)
        router = c.pdserve_router("r", [p], [d], args=["--policy", "round_robin"])
        c.wait_healthy([router], timeout=30)

        async def main():
            async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
                deadline = time.monotonic() + 20
                while True:  # the router admits workers on its first health round
                    r = await client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}})
                    if r.status_code == 200 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.25)
                rs = await asyncio.gather(*(client.post("/generate", json={
                    "input_ids": list(range(10, 10 + 100 + k)), "sampling_params": {"max_new_tokens": 16}})
                    for k in range(64)))
                return rs

        rs = asyncio.run(main())
        assert [r.status_code for r in rs] == [200] * 64
        pairs = {(r.json()["meta_info"]["prefill_dp_rank"], r.json()["meta_info"]["decode_dp_rank"]) for r in rs}
        assert {i for i, _ in pairs} == set(range(8)) and {j for _, j in pairs} == set(range(8))
    assert time.monotonic() - start < 60


def test_profile_round_trip_on_the_tiny_model(tmp_path):
    """``pdserve bench profile`` times the real engine; ``--simulate profile:FILE`` serves with that timing."""
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "profile", "--output", str(out),
                    "--torch-threads", "1", "--max-total-tokens", "4096", "--batch-sizes", "1,4",
                    "--prompt-len", "8,96", "--output-len", "6", "--repeats", "1"],
                   check=True, timeout=240, cwd=REPO_ROOT, capture_output=True)
    data = json.loads(out.read_text())
    assert data["samples"] >= 10 and data["kv_capacity_tokens"] == 4096
    coef = data["coefficients"]
    assert coef["step"] + coef["decode"] > 0 and all(v >= 0 for v in coef.values())
    trace = tmp_path / "trace"
    with Cluster(tmp_path / "logs") as c:
        s = c.server("prof", dp_size=1, extra=["--simulate", f"profile:{out}", "--step-trace", str(trace)])
        c.wait_healthy([s], timeout=90)
        assert loads(s.url)[0]["num_total_pages"] * 16 == 4096
        status, body = post_json(s.url + "/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 10}})
        assert status == 200 and body["meta_info"]["completion_tokens"] == 10
        # ten decode steps at the profiled per-step cost, at least
        assert body["meta_info"]["e2e_latency"] >= 9 * (coef["step"] + coef["decode"]) * 0.9
        for n in (40, 90):
            status, _ = post_json(s.url + "/generate", {"input_ids": list(range(5, 5 + n)),
                                                        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
            assert status == 200
    # the served steps' trace, fitted again, gives back the step times the sim served them with
    refit = tmp_path / "refit.json"
    subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "profile", "--output", str(refit),
                    "--from-trace", f"{trace}.rank0.jsonl"], check=True, timeout=120, cwd=REPO_ROOT,
                   capture_output=True)
    from pdserve.bench.profile import trace_samples
    from pdserve.sim.profiled import ProfiledCost

    samples, capacity = trace_samples([f"{trace}.rank0.jsonl"])
    assert len(samples) >= 20 and capacity == 4096
    served, fitted = ProfiledCost.load(str(out)), ProfiledCost.load(str(refit))
    modelled = sum(served.step_seconds(x) for x, _ in samples)
    assert sum(t for _, t in samples) == pytest.approx(modelled, rel=0.4)
    assert sum(fitted.step_seconds(x) for x, _ in samples) == pytest.approx(modelled, rel=0.4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "profile", "--output", str(refit),
                          "--from-trace", str(bad)], timeout=120, cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "not a step trace" in run.stderr
