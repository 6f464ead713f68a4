"""The router end to end with real ``pdserve serve`` processes.

Fleet: two prefill servers (DP 2 each), one decode server (DP 3), and a mixed-mode server whose
greedy output is the reference. Routers run in-process on free ports; servers run in their own
process groups and are killed in finalizers. ``pdserve launch`` is tested as a whole process tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdserve.router.config import WorkerSpec
from tests.router_harness import router_client
from tests.server_harness import REPO_ROOT, ServerProcess, alive, children, free_port, wait_until

SERVER_FLAGS = ["--max-total-tokens", "1024", "--page-size", "16", "--chunked-prefill-size", "64",
                "--log-level", "warning"]
PROMPTS = ["Hello world", "Once upon a time, in a small village", "def add(a, b):", "The capital of France",
           "1, 2, 3, 4,", "A long time ago in a galaxy far"]
MAX_NEW = 8
POLICIES = ("random", "round_robin", "least_load", "power_of_two", "cache_aware")


def serve(args: list[str], log_dir: Path, name: str, port: int | None = None) -> ServerProcess:
    """``pdserve serve`` in its own process group on ``port`` (a free one by default)."""
    port = port or free_port()
    log_path = log_dir / f"{name}-{port}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *SERVER_FLAGS, *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
    return ServerProcess(proc, port, log_path)


def prefill_args(dp: int) -> list[str]:
    return ["--disaggregation-mode", "prefill", "--dp-size", str(dp),
            "--disaggregation-bootstrap-port", str(free_port())]


def decode_args(dp: int) -> list[str]:
    return ["--disaggregation-mode", "decode", "--dp-size", str(dp)]


class Fleet:
    """Two prefill servers (DP 2 each) and one decode server (DP 3), plus any started by a test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.prefills = [serve(prefill_args(2), log_dir, f"prefill{i}") for i in range(2)]
        self.decode = serve(decode_args(3), log_dir, "decode")
        self.extra: list[ServerProcess] = []

    @property
    def all(self) -> list[ServerProcess]:
        return [*self.prefills, self.decode, *self.extra]

    def specs(self) -> list[WorkerSpec]:
        return [WorkerSpec(p.url, "prefill") for p in self.prefills] + [WorkerSpec(self.decode.url, "decode")]

    def stop(self) -> None:
        for s in self.all:
            s.stop()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A mixed-mode server: the reference output, and the upstream of the mixed-mode router test."""
    server = serve(["--dp-size", "1"], tmp_path_factory.mktemp("router-mixed"), "mixed")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, mixed):
    f = Fleet(tmp_path_factory.mktemp("router-e2e"))
    try:
        for s in f.all:
            s.wait_healthy()
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def reference(mixed) -> dict[str, dict]:
    """The mixed server's greedy output per prompt."""
    out = {}
    for prompt in PROMPTS:
        r = httpx.post(mixed.url + "/generate", timeout=60, json={
            "text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
        assert r.status_code == 200, r.text
        out[prompt] = r.json()
    return out


def used_pages(server: ServerProcess) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def assert_idle(fleet: Fleet, timeout: float = 20.0) -> None:
    servers = [*fleet.prefills, fleet.decode]
    assert wait_until(lambda: all(used_pages(s) == 0 for s in servers), timeout), [
        httpx.get(s.url + "/get_load").json() for s in servers]


async def generate_all(c: httpx.AsyncClient, prompts: list[str], **extra) -> list[dict]:
    async def one(prompt: str) -> dict:
        r = await c.post("/generate", json={
            "text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    return await asyncio.gather(*(one(p) for p in prompts))


def rank_pairs(results: list[dict]) -> set[tuple[int, int]]:
    return {(r["meta_info"]["prefill_dp_rank"], r["meta_info"]["decode_dp_rank"]) for r in results}


def assert_logprobs_close(got: list, want: list) -> None:
    """Logprob triples (or lists of them, for top logprobs): same tokens, logprobs within 1e-4."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if not g or isinstance(g[0], list):
            assert_logprobs_close(g or [], w or [])
        else:
            assert g[1] == w[1] and (g[0] is None) == (w[0] is None)
            assert g[0] is None or abs(g[0] - w[0]) < 1e-4, (g, w)


# ---------------------------------------------------------------------- correctness and placement


def test_every_policy_matches_mixed_output(fleet, reference):
    async def run() -> set[tuple[int, int]]:
        pairs: set[tuple[int, int]] = set()
        for policy in POLICIES:
            async with router_client(fleet.specs(), prefill_policy=policy, decode_policy=policy) as (c, _):
                results = await generate_all(c, PROMPTS * 2)
                for prompt, result in zip(PROMPTS * 2, results):
                    assert result["output_ids"] == reference[prompt]["output_ids"], (policy, prompt)
                    assert result["text"] == reference[prompt]["text"]
                pairs |= rank_pairs(results)
        return pairs

    pairs = asyncio.run(run())
    assert any(i != j for i, j in pairs), pairs  # decode rank j fed from prefill rank i != j
    assert {j for _, j in pairs} == {0, 1, 2} and {i for i, _ in pairs} == {0, 1}
    assert_idle(fleet)


def test_streaming_openai_and_logprobs_through_router(fleet, mixed, reference):
    async def run() -> None:
        async with router_client(fleet.specs()) as (c, _):
            prompt = PROMPTS[1]
            body = {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}, "stream": True}
            async with c.stream("POST", "/generate", json=body) as r:
                assert r.status_code == 200
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == reference[prompt]["text"]
            logprob_body = {**body, "stream": False, "return_logprob": True, "logprob_start_len": 0,
                            "top_logprobs_num": 2}
            meta = (await c.post("/generate", json=logprob_body)).json()["meta_info"]
            direct = httpx.post(mixed.url + "/generate", json=logprob_body, timeout=60).json()["meta_info"]
            assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]  # prefill's, through decode's Aux
            for name in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs"):
                assert_logprobs_close(meta[name], direct[name])
            r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[prompt]["text"]
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            assert (await c.get("/v1/models")).json()["data"][0]["id"]

    asyncio.run(run())
    assert_idle(fleet)


def test_least_load_spreads_concurrent_requests(fleet):
    async def run() -> None:
        async with router_client(fleet.specs(), prefill_policy="least_load", decode_policy="least_load") as (c, state):
            await generate_all(c, [f"{p} {i}" for i in range(3) for p in PROMPTS])
            counts = {}
            for m in state.metrics.selections.collect():
                for s in m.samples:
                    if s.name.endswith("_total"):
                        counts[(s.labels["side"], s.labels["worker"], s.labels["dp_rank"])] = s.value
            prefill = [v for (side, _, _), v in counts.items() if side == "prefill"]
            decode = [v for (side, _, _), v in counts.items() if side == "decode"]
            assert len(prefill) == 4 and len(decode) == 3, counts  # every unit was used
            assert max(prefill) <= 8 and max(decode) <= 10, counts  # 18 requests: none hogs the work

    asyncio.run(run())


def test_dp_coupled_pairs_equal_ranks(fleet, reference):
    async def run() -> set[tuple[int, int]]:
        async with router_client(fleet.specs(), prefill_policy="random", decode_policy="random",
                                 dp_coupled=True) as (c, _):
            results = await generate_all(c, PROMPTS * 3)
            for prompt, result in zip(PROMPTS * 3, results):
                assert result["output_ids"] == reference[prompt]["output_ids"]
            return rank_pairs(results)

    pairs = asyncio.run(run())
    assert all(i == j % 2 for i, j in pairs), pairs  # prefill DP 2, decode DP 3: rank j takes j % 2
    assert all(i == j for i, j in pairs if j < 2)


def test_mixed_mode_router_matches_direct(mixed, reference):
    async def run() -> None:
        async with router_client([WorkerSpec(mixed.url, "mixed")]) as (c, _):
            results = await generate_all(c, PROMPTS)
            for prompt, result in zip(PROMPTS, results):
                assert result["output_ids"] == reference[prompt]["output_ids"]
                assert result["meta_info"]["dp_rank"] == 0
            body = {"text": "Tell me a story", "stream": True,
                    "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
            async with c.stream("POST", "/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
                assert used_pages(mixed) > 0
        assert wait_until(lambda: used_pages(mixed) == 0, 10.0)

    asyncio.run(run())


# ---------------------------------------------------------------------- faults


def test_client_disconnect_mid_stream_frees_pages(fleet):
    async def run() -> None:
        async with router_client(fleet.specs()) as (c, _):
            body = {"text": "Tell me a story", "stream": True,
                    "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
            async with c.stream("POST", "/generate", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        break
                assert used_pages(fleet.decode) > 0

    asyncio.run(run())
    assert_idle(fleet, 10.0)


def test_killed_decode_server_is_evicted_and_readmitted(fleet, reference):
    extra = serve(decode_args(1), fleet.log_dir, "decode-extra")
    fleet.extra.append(extra)
    extra.wait_healthy()

    async def run() -> None:
        async with router_client(fleet.specs(), decode_policy="round_robin") as (c, state):
            r = await c.post("/add_worker", params={"url": extra.url, "type": "decode"})
            assert r.status_code == 200, r.text
            worker = state.fleet.workers[extra.url]
            await generate_all(c, PROMPTS)
            assert state.fleet.workers[extra.url].healthy
            # kill it while requests run there: none has sent a byte to its client, so all are retried
            long = {"sampling_params": {"max_new_tokens": 64, "ignore_eos": True, "temperature": 0}}
            pending = [asyncio.ensure_future(c.post("/generate", json={"text": p, **long})) for p in PROMPTS * 2]
            assert await asyncio.to_thread(wait_until, lambda: used_pages(extra) > 0, 20.0)
            os.killpg(extra.proc.pid, signal.SIGKILL)
            extra.proc.wait()
            for r in await asyncio.gather(*pending):
                assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 64, r.text
            failures = state.metrics.failures.collect()[0].samples
            assert any(s.labels.get("worker") == extra.url and s.value > 0 for s in failures)
            for _ in range(50):
                if not worker.healthy:
                    break
                await asyncio.sleep(0.1)
            assert not worker.healthy
            results = await generate_all(c, PROMPTS)
            assert all(r["meta_info"]["decode_dp_rank"] in (0, 1, 2) for r in results)
            restarted = serve(decode_args(1), fleet.log_dir, "decode-extra", port=extra.port)
            fleet.extra.append(restarted)
            await asyncio.to_thread(restarted.wait_healthy)
            for _ in range(100):
                if worker.healthy:
                    break
                await asyncio.sleep(0.1)
            assert worker.healthy
            await generate_all(c, PROMPTS)
            served = state.metrics.selections.labels("decode", extra.url, "0")._value.get()
            assert served > 0

    asyncio.run(run())
    assert_idle(fleet)


# ---------------------------------------------------------------------- launcher


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for kid in children(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def test_launch_serves_and_stops_on_sigint(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = tmp_path / "launch.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "launch", "--port", str(port), "--max-total-tokens", "1024"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
            start_new_session=True,
        )
    tree: set[int] = set()
    try:
        assert wait_until(lambda: "[launch] ready" in log_path.read_text() or proc.poll() is not None, 180), \
            log_path.read_text()[-4000:]
        assert proc.poll() is None, log_path.read_text()[-4000:]
        out = log_path.read_text()
        assert "curl" in out and "[prefill-0] " in out and "[decode-0] " in out and "[router] " in out
        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=60,
                       json={"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
        meta = r.json()["meta_info"]  # the router process relays the ranks that served it as headers
        assert (int(r.headers["X-Prefill-DP-Rank"]), int(r.headers["X-Decode-DP-Rank"])) == (
            meta["prefill_dp_rank"], meta["decode_dp_rank"])
        tree = descendants(proc.pid)
        assert len(tree) >= 7  # 2 server fronts, 2 + 2 DP workers, the router
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode == 0
        assert wait_until(lambda: not any(alive(p) for p in tree), 10), [p for p in tree if alive(p)]
        assert "[launch] stopped" in log_path.read_text()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in tree:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def router_process(args: list[str], log_dir: Path) -> ServerProcess:
    """``pdserve router`` as its own process group on a free port."""
    port = free_port()
    log_path = log_dir / f"router-{port}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
    return ServerProcess(proc, port, log_path)


def generate_answers(url: str) -> float:
    """``/generate`` answers counted in the router's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('pdserve_router_requests_total{route="/generate"'))


def test_router_processes_share_the_port_and_sum_their_metrics(fleet, reference, tmp_path):
    """--router-processes 2: both processes serve (each in turn, the other SIGSTOPped), answers equal
    the mixed server's, /metrics sums both whichever answers, a killed process is replaced, runtime
    worker changes are refused, and SIGTERM stops the whole tree."""
    args = ["--pd-disaggregation", "--router-processes", "2", "--policy", "round_robin"]
    for p in fleet.prefills:
        args += ["--prefill", p.url]
    args += ["--decode", fleet.decode.url]
    router = router_process(args, tmp_path)
    try:
        router.wait_healthy()
        procs = children(router.proc.pid)
        assert len(procs) == 2, procs

        def generate_each(prompts: list[str]) -> None:
            for prompt in prompts:  # a new connection each: whichever process accepts it serves it
                r = httpx.post(router.url + "/generate", timeout=60, headers={"Connection": "close"},
                               json={"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
                assert r.status_code == 200, r.text
                assert r.json()["output_ids"] == reference[prompt]["output_ids"]

        served = 0
        for stopped in procs:  # only the other process can accept while one is stopped
            os.kill(stopped, signal.SIGSTOP)
            try:
                generate_each(PROMPTS[:3])
                served += 3
            finally:
                os.kill(stopped, signal.SIGCONT)
        assert generate_answers(router.url) == served
        refused = httpx.post(router.url + f"/add_worker?url={fleet.decode.url}&type=decode", timeout=10)
        assert refused.status_code == 409 and "--router-processes" in refused.json()["error"]["message"]

        os.kill(procs[0], signal.SIGKILL)
        assert wait_until(lambda: len(children(router.proc.pid)) == 2 and procs[0] not in children(router.proc.pid),
                          20), children(router.proc.pid)
        router.wait_healthy()
        generate_each(PROMPTS[3:])
        assert generate_answers(router.url) == served + len(PROMPTS) - 3
        assert_idle(fleet)

        survivors = children(router.proc.pid)
        router.proc.send_signal(signal.SIGTERM)
        assert router.proc.wait(timeout=20) == 0
        assert not any(alive(pid) for pid in survivors)
    finally:
        router.stop()
