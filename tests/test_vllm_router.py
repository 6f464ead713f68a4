"""vllm-router 0.1.17 (``--vllm-pd-disaggregation``, the real Rust binary from PyPI) in front of a pdserve
P/D pair with unequal DP sizes (prefill DP 2, decode DP 3), speaking vLLM's P/D protocol:
``kv_transfer_params`` on both legs, ``X-data-parallel-rank`` per leg.

Two routers share the servers: ``--kv-connector nixl`` (the two-step flow: prefill answers the params,
the router forwards them to decode) and ``--kv-connector mooncake`` (the router queries the prefill's
bootstrap ``/query`` for engine ids per DP rank and sends both legs a ``transfer_id``). Both run
``--intra-node-data-parallel-size 3`` with round-robin policies: the router discovers each server's
DP size from the ``vllm:`` series of ``/metrics`` and addresses every rank pair; its own choices (read
from its debug log) are the ranks pdserve serves. Every answer equals a mixed server's greedy one, the
KV really moved (bytes in ``meta_info``, the decode access log names room and both ranks), every
lying or malformed ``kv_transfer_params`` is a 400 naming the field without harming the room it
names, pages are freed after each scenario, and guidellm 0.8.1 runs through the router with 0 errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import REPO_ROOT, free_port, launch, wait_until

COMMON = ["--torch-threads", "1", "--page-size", "4", "--max-total-tokens", "4096"]
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "5", "--disaggregation-waiting-timeout", "10",
               "--disaggregation-transfer-timeout", "5"]
MODEL = "tiny-llama-v1"
PROMPTS = ["The history of the world in a few words", "Once upon a time, in a small village by the sea",
           "def add(a, b):", "Hello", "1, 2, 3, 4,", "A long time ago in a galaxy far"]
ROUTES = ("/v1/completions", "/v1/chat/completions")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHOICE = re.compile(r"Prefill worker: \S+@(\d+), Decode worker: \S+@(\d+), Path: (\S+)")
ACCESS = re.compile(r"room=(\d+) prefill_rank=(\d+) decode_rank=(\d+)")


def start_router(servers: dict, connector: str, log_dir: Path) -> tuple[subprocess.Popen, str, Path]:
    binary = shutil.which("vllm-router")
    if binary is None:
        message = "vllm-router is not installed (the test extra pins vllm-router==0.1.17)"
        if os.environ.get("PDSERVE_REQUIRE_CLIENTS") == "1":  # CI: a missing router fails, never skips
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    prefill = [servers["prefill"].url] + ([str(servers["bootstrap_port"])] if connector == "mooncake" else [])
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation", "--kv-connector", connector,
           "--prefill", *prefill, "--decode", servers["decode"].url, "--policy", "round_robin",
           "--intra-node-data-parallel-size", "3", "--api-key", "unused-by-pdserve",  # the flag needs one
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
           "--worker-startup-check-interval", "1", "--log-level", "debug"]
    log_path = log_dir / f"vllm-router-{connector}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                                start_new_session=True, env={**os.environ, "NO_COLOR": "1"})
    return proc, f"http://127.0.0.1:{port}", log_path


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-router")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--chunked-prefill-size", "8",
                      "--disaggregation-bootstrap-port", str(bootstrap_port), *COMMON, *PD_TIMEOUTS,
                      "--log-level", "warning"], logs)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "3", *COMMON, *PD_TIMEOUTS,
                     "--log-level", "info"], logs)  # info: the access log
    mixed = launch([*COMMON, "--log-level", "warning"], logs)
    routers: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        for server in (prefill, decode, mixed):
            server.wait_healthy()
        found = {"prefill": prefill, "decode": decode, "mixed": mixed, "bootstrap_port": bootstrap_port}
        for connector in ("nixl", "mooncake"):
            routers[connector] = start_router(found, connector, logs)
        for proc, url, log_path in routers.values():
            def up(url=url) -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(url + "/health", timeout=2).status_code == 200
                return False

            assert wait_until(up, 60, 0.3), log_path.read_text(errors="replace")[-3000:]
            assert proc.poll() is None
        yield {**found, "routers": {name: url for name, (_, url, _) in routers.items()},
               "router_logs": {name: path for name, (_, _, path) in routers.items()}}
    finally:
        for proc, _, _ in routers.values():
            stop(proc)
        for server in (prefill, decode, mixed):
            server.stop()


def body(path: str, text: str, stream: bool = False, max_tokens: int = 8) -> dict:
    base = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if path == "/v1/completions":
        return {**base, "prompt": text}
    return {**base, "messages": [{"role": "user", "content": text}]}


def answer(path: str, resp: httpx.Response, stream: bool) -> tuple[str, dict]:
    """The generated text and the (last) choice's meta_info of a response, streamed or not."""
    assert resp.status_code == 200, resp.text
    if not stream:
        choice = resp.json()["choices"][0]
        return (choice["text"] if path == "/v1/completions" else choice["message"]["content"]), choice["meta_info"]
    lines = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", resp.text[-400:]
    events = [json.loads(line) for line in lines[:-1]]
    choices = [e["choices"][0] for e in events if e["choices"]]
    key = "text" if path == "/v1/completions" else "delta"
    text = "".join(c[key] if key == "text" else (c[key].get("content") or "") for c in choices)
    return text, next(c["meta_info"] for c in reversed(choices) if c.get("meta_info"))


def reference(servers: dict, path: str, text: str) -> str:
    return answer(path, httpx.post(servers["mixed"].url + path, json=body(path, text), timeout=60), False)[0]


def used_pages(server) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def assert_pages_freed(servers: dict) -> None:
    for name in ("prefill", "decode"):
        assert wait_until(lambda n=name: used_pages(servers[n]) == 0, 15), f"{name} still holds KV pages"


def router_choices(log_path: Path) -> list[tuple[int, int, str]]:
    """(prefill rank, decode rank, path) of every request the router dispatched, in order."""
    text = ANSI.sub("", log_path.read_text(errors="replace"))
    return [(int(p), int(d), path) for p, d, path in CHOICE.findall(text)]


def access_lines(servers: dict) -> list[tuple[int, int, int]]:
    """(room, prefill rank, decode rank) of the decode server's access log lines with a room."""
    text = servers["decode"].log_path.read_text(errors="replace")
    return [(int(room), int(p), int(d)) for room, p, d in ACCESS.findall(text)]


@pytest.mark.parametrize("connector", ["nixl", "mooncake"])
def test_every_rank_pair_is_the_routers_choice_and_matches_mixed(servers, connector):
    """Six sequential requests (round robin over 2 prefill and 3 decode ranks: every pair once), through
    completions and chat, streamed and not: each answer equals the mixed server's, its KV moved
    (bytes, room, both ranks in meta_info and in the decode access log), and the ranks served are the
    ones the router chose."""
    url, log_path = servers["routers"][connector], servers["router_logs"][connector]
    before = len(router_choices(log_path))
    cases = [(ROUTES[i % 2], PROMPTS[i], i % 3 == 0) for i in range(6)]
    served = []
    for path, text, stream in cases:
        resp = httpx.post(url + path, json=body(path, text, stream), timeout=60)
        got, meta = answer(path, resp, stream)
        assert got == reference(servers, path, text), (connector, path, stream)
        assert meta["kv_transfer_bytes"] > 0 and meta["bootstrap_room"] is not None, meta
        served.append((meta["prefill_dp_rank"], meta["decode_dp_rank"], path, meta["bootstrap_room"]))
    chosen = router_choices(log_path)[before:]
    assert [(p, d, path) for p, d, path, _ in served] == chosen, (served, chosen)
    assert {(p, d) for p, d, _, _ in served} == {(p, d) for p in range(2) for d in range(3)}
    logged = set(access_lines(servers))
    assert {(room, p, d) for p, d, _, room in served} <= logged
    assert_pages_freed(servers)


def test_discovers_unequal_dp_sizes_from_metrics(servers):
    """vllm-router counts the engine labels of the vllm: series: 2 prefill engines, 3 decode engines."""
    text = ANSI.sub("", servers["router_logs"]["nixl"].read_text(errors="replace"))
    assert f"Worker {servers['prefill'].url} reports 2 engine(s)" in text
    assert f"Worker {servers['decode'].url} reports 3 engine(s)" in text


def test_mooncake_query_lists_the_engines(servers):
    """The prefill bootstrap answers vLLM's Mooncake /query: one engine id per DP rank."""
    query = httpx.get(f"http://127.0.0.1:{servers['bootstrap_port']}/query", timeout=10).json()
    assert sorted(query) == ["0", "1"]
    ids = [query[r]["engine_id"] for r in ("0", "1")]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"pdserve-[0-9a-f]{16}-dp[01]", i) for i in ids)


def prefill_leg(servers: dict, rank: int, text: str = PROMPTS[1]) -> dict:
    """A NIXL-style prefill half sent directly (as vllm-router sends it); its answer's params."""
    resp = httpx.post(servers["prefill"].url + "/v1/completions", headers={"X-data-parallel-rank": str(rank)},
                      timeout=60, json={**body("/v1/completions", text, max_tokens=1), "min_tokens": 1,
                                        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                                               "remote_engine_id": None, "remote_block_ids": None,
                                                               "remote_host": None, "remote_port": None}})
    assert resp.status_code == 200, resp.text
    params = resp.json()["kv_transfer_params"]
    assert params["remote_dp_rank"] == rank and params["remote_port"] == servers["bootstrap_port"]
    return params


def test_lying_or_malformed_params_are_400_naming_the_field(servers):
    """Every lie or malformed value is a 400 naming ``kv_transfer_params.<key>``; the lies name a live room,
    which then still serves its honest decode half (no other room harmed)."""
    good = prefill_leg(servers, 1)
    instance = good["remote_engine_id"].split("-")[1]
    mooncake = {"do_remote_prefill": True, "transfer_id": "t-1", "remote_engine_id": good["remote_engine_id"]}
    cases = [
        ("x", "kv_transfer_params"),
        ({**good, "bogus": 1}, "kv_transfer_params.bogus"),
        ({**good, "remote_engine_id": "engine-7"}, "kv_transfer_params.remote_engine_id"),
        ({**good, "remote_engine_id": 7}, "kv_transfer_params.remote_engine_id"),
        ({**good, "remote_engine_id": "pdserve-0123456789abcdef-dp1"}, "kv_transfer_params.remote_engine_id"),
        ({**good, "remote_engine_id": f"pdserve-{instance}-dp7", "remote_dp_rank": 7},
         "kv_transfer_params.remote_engine_id"),  # no such prefill rank
        ({**good, "remote_engine_id": f"pdserve-{instance}-dp0", "remote_dp_rank": 0},
         "kv_transfer_params.remote_engine_id"),  # the room is on rank 1
        ({**good, "remote_dp_rank": 0}, "kv_transfer_params.remote_dp_rank"),
        ({**good, "remote_host": "8.8.8.8"}, "kv_transfer_params.remote_host"),
        ({**good, "remote_port": "8998"}, "kv_transfer_params.remote_port"),
        ({**good, "remote_port": 1 << 64}, "kv_transfer_params.remote_port"),
        ({**good, "remote_room": -1}, "kv_transfer_params.remote_room"),
        ({**good, "remote_room": good["remote_room"] ^ 1}, "kv_transfer_params.remote_room"),  # not a room there
        ({**good, "remote_block_ids": [0, 1 << 40]}, "kv_transfer_params.remote_block_ids"),
        ({**good, "remote_block_ids": list(range(1000))}, "kv_transfer_params.remote_block_ids"),
        ({**good, "do_remote_decode": True}, "kv_transfer_params"),
        ({**good, "do_remote_prefill": "yes"}, "kv_transfer_params.do_remote_prefill"),
        ({**good, "tp_size": 2}, "kv_transfer_params.tp_size"),
        ({**good, "remote_request_id": "x" * (30 << 20)}, "kv_transfer_params.remote_request_id"),  # 30 MiB
        ({**mooncake, "remote_bootstrap_addr": "ftp://127.0.0.1:1"}, "kv_transfer_params.remote_bootstrap_addr"),
        ({**mooncake, "remote_bootstrap_addr": "http://8.8.4.4:8998"}, "kv_transfer_params.remote_bootstrap_addr"),
    ]
    for params, field in cases:
        resp = httpx.post(servers["decode"].url + "/v1/completions", headers={"X-data-parallel-rank": "2"},
                          json={**body("/v1/completions", PROMPTS[1]), "kv_transfer_params": params}, timeout=60)
        assert resp.status_code == 400, (field, resp.text[:300])
        error = resp.json()["error"]
        # a value JSON decoding itself refuses (an integer past 64 bits) is named by the typed decode
        assert error["param"] == field or (error["param"] == "kv_transfer_params" and field in error["message"]), (
            field, resp.text[:300])
    disagrees = httpx.post(servers["decode"].url + "/v1/completions", timeout=30, json={
        **body("/v1/completions", PROMPTS[1]), "kv_transfer_params": good, "disagg_prefill_dp_rank": 0})
    assert disagrees.status_code == 400 and disagrees.json()["error"]["param"] == "disagg_prefill_dp_rank"
    both = httpx.post(servers["decode"].url + "/v1/completions", timeout=30, json={
        **body("/v1/completions", PROMPTS[1]), "kv_transfer_params": good, "bootstrap_room": 5})
    assert both.status_code == 400 and both.json()["error"]["param"] == "bootstrap_room"
    wrong_role = httpx.post(servers["prefill"].url + "/v1/completions", timeout=30,
                            json={**body("/v1/completions", PROMPTS[1]), "kv_transfer_params": good})
    assert wrong_role.status_code == 400 and wrong_role.json()["error"]["param"] == "kv_transfer_params.do_remote_prefill"
    on_mixed = httpx.post(servers["mixed"].url + "/v1/completions", timeout=30,
                          json={**body("/v1/completions", PROMPTS[1]), "kv_transfer_params": {"do_remote_decode": True}})
    assert on_mixed.status_code == 400 and on_mixed.json()["error"]["param"] == "kv_transfer_params.do_remote_decode"
    honest = httpx.post(servers["decode"].url + "/v1/completions", headers={"X-data-parallel-rank": "2"}, timeout=60,
                        json={**body("/v1/completions", PROMPTS[1]), "kv_transfer_params": good})
    text, meta = answer("/v1/completions", honest, False)
    assert text == reference(servers, "/v1/completions", PROMPTS[1])
    assert (meta["prefill_dp_rank"], meta["decode_dp_rank"], meta["bootstrap_room"]) == (1, 2, good["remote_room"])
    assert_pages_freed(servers)


def test_answered_room_without_decode_frees_its_kv(servers):
    """A prefill half whose decode never comes holds its KV only until the waiting timeout."""
    prefill_leg(servers, 0, PROMPTS[2])
    assert wait_until(lambda: used_pages(servers["prefill"]) > 0, 5), "the answered room holds no KV"
    assert wait_until(lambda: used_pages(servers["prefill"]) == 0, 25), "the unanswered room kept its KV"


def test_guidellm_through_vllm_router(servers, tmp_path):
    """guidellm 0.8.1, unmodified, a short constant-rate run through the NIXL-style router: 0 errors."""
    from tests.test_bench_clients import CLIENT_ENV, client_binary

    guidellm = client_binary("guidellm", "guidellm")
    info = httpx.get(servers["mixed"].url + "/model_info", timeout=10).json()
    report = tmp_path / "guidellm.json"
    requests = 12
    cmd = [guidellm, "run", "--backend",
           f"kind=openai_http,target={servers['routers']['nixl']},model={info['served_model_name']}",
           "--profile", "kind=constant,rate=6", "--constraint", f"kind=max_requests,count={requests}",
           "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
           "--tokenizer", f"kind=hf_auto,model={info['tokenizer_path']}", "--output", f"kind=json,path={report}",
           "--disable-console-interactive"]
    start = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **CLIENT_ENV}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    totals = json.loads(report.read_text())["benchmarks"][0]["metrics"]["request_totals"]
    print(f"guidellm x vllm-router (nixl): {totals} in {time.monotonic() - start:.1f} s")
    assert totals == {"successful": requests, "errored": 0, "incomplete": 0, "total": requests}
    assert_pages_freed(servers)


def test_mooncake_prefill_refusal_reaches_a_waiting_decode_at_once(servers):
    """Mooncake style, decode half first: when the prefill front refuses its half (bad input), the decode
    half fails at once with the prefill's reason instead of waiting out the waiting timeout (the front
    reads the room from ``kv_transfer_params.transfer_id`` as it does from ``bootstrap_room``)."""
    import concurrent.futures

    engine = httpx.get(f"http://127.0.0.1:{servers['bootstrap_port']}/query", timeout=10).json()["1"]["engine_id"]
    transfer = f"xfer-refused-{time.monotonic_ns()}"
    decode_params = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": transfer,
                     "remote_bootstrap_addr": f"http://127.0.0.1:{servers['bootstrap_port']}",
                     "remote_engine_id": engine}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        decode = pool.submit(httpx.post, servers["decode"].url + "/v1/completions", headers={"X-data-parallel-rank": "0"},
                             json={**body("/v1/completions", PROMPTS[3]), "kv_transfer_params": decode_params},
                             timeout=60)
        time.sleep(0.5)  # the decode half is waiting for its prefill half
        prefill = httpx.post(servers["prefill"].url + "/v1/completions", headers={"X-data-parallel-rank": "1"}, timeout=30,
                             json={**body("/v1/completions", PROMPTS[3], max_tokens=1), "temperature": -1,
                                   "kv_transfer_params": {"do_remote_decode": True, "transfer_id": transfer}})
        assert prefill.status_code == 400, prefill.text
        resp = decode.result()
    # as with SGLang's room fields: a retryable 503 carrying the prefill server's refusal
    message = resp.json()["error"]["message"]
    assert resp.status_code == 503 and message.startswith("prefill failed:") and "temperature" in message, message
    assert time.monotonic() - start < 8  # well inside the 10 s waiting timeout
    assert_pages_freed(servers)
