"""P/D end to end with real ``pdserve serve`` processes: a prefill server (DP 2), a decode server
(DP 3) and a mixed server for reference; every rank pair through every generation route, the
request-field spellings, 64 concurrent requests, failures reaching the other side (a refused
request, a killed prefill server), 409, metrics, and sglang-router 0.3.2 in PD mode in front of
them; then the same scenarios (rank pairs, routes, both arrival orders, decode prefix reuse, a decode
abort, a killed prefill, sglang-router) on each other byte-moving backend: shm, nixl and mooncake.

The prefill and decode servers stage their KV pages through host buffers as GPU pools do
(``PDSERVE_TEST_KV_STAGING=1``), so the GPU transfer path runs end to end here on CPU pools; the
other P/D test modules cover the unstaged tcp path."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_harness import REPO_ROOT, free_port, launch, wait_until

COMMON = ["--torch-threads", "1", "--page-size", "4", "--max-total-tokens", "4096", "--log-level", "warning"]
WAITING_S = 10  # short enough to test the bound, long enough for 64 queued pairs on 2 busy cores
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "3", "--disaggregation-waiting-timeout", str(WAITING_S),
               "--disaggregation-transfer-timeout", "5"]
GREEDY = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0}
STAGED = {"PDSERVE_TEST_KV_STAGING": "1"}  # the tcp backend's GPU path (host staging), on these CPU pools
PROMPTS = ["The history of the world in a few words", "Once upon a time, in a small village by the sea",
           "def add(a, b):", "Hello"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-logs")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--chunked-prefill-size", "8",
                      "--disaggregation-bootstrap-port", str(bootstrap_port), *COMMON, *PD_TIMEOUTS], logs, env=STAGED)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "3", *COMMON, *PD_TIMEOUTS], logs, env=STAGED)
    mixed = launch(COMMON, logs)
    try:
        for server in (prefill, decode, mixed):
            server.wait_healthy()
        yield {"prefill": prefill, "decode": decode, "mixed": mixed, "bootstrap_port": bootstrap_port}
    finally:
        for server in (prefill, decode, mixed):
            server.stop()


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


def post(server, body: dict, headers: dict | None = None, path: str = "/generate", timeout: float = 30) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def pd_pair(servers, pool, body: dict, prefill_extra: dict, decode_extra: dict, decode_headers=None):
    """Send the prefill and the decode half of one request concurrently; both responses."""
    p = pool.submit(post, servers["prefill"], {**body, **prefill_extra})
    d = pool.submit(post, servers["decode"], {**body, **decode_extra}, decode_headers)
    return p.result(), d.result()


def room_body(servers, text: str, room: int, params=GREEDY) -> dict:
    return {"text": text, "sampling_params": params, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": servers["bootstrap_port"], "bootstrap_room": room}


def used_pages(server) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def waiting_reqs(server) -> int:
    return sum(rank["num_waiting_reqs"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def assert_pages_freed(servers) -> None:
    for name in ("prefill", "decode"):
        assert wait_until(lambda n=name: used_pages(servers[n]) == 0, 10), f"{name} still holds KV pages"


def pd_failure(resp: httpx.Response) -> str:
    """A failed pairing answers 503 (so a router may retry with a fresh pair); returns the message."""
    assert resp.status_code == 503, resp.text
    return resp.json()["error"]["message"]


SHORT = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")


def sse_events(resp: httpx.Response) -> list[dict]:
    """The JSON events of an SSE response, which must end with ``data: [DONE]``."""
    assert resp.status_code == 200, resp.text
    lines = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", resp.text[-500:]
    events = [json.loads(line) for line in lines[:-1]]
    assert not any("error" in e for e in events), resp.text[-500:]
    return events


def openai_body(path: str, text: str, stream: bool = False) -> dict:
    """A greedy 8-token request for an OpenAI route."""
    body = {"model": "tiny-llama-v1", "max_tokens": 8, "min_tokens": 8, "temperature": 0, "stream": stream}
    if path == "/v1/completions":
        return {**body, "prompt": text}
    return {**body, "messages": [{"role": "user", "content": text}]}


def output_of(path: str, resp: httpx.Response, stream: bool) -> str | list[int]:
    """What a response generated: output ids for /generate, the text for the OpenAI routes
    (concatenated over the chunks when streamed)."""
    if path == "/generate":
        return (sse_events(resp)[-1] if stream else resp.json())["output_ids"]
    assert stream or resp.status_code == 200, resp.text
    key = "text" if path == "/v1/completions" else ("delta" if stream else "message")
    items = [e["choices"][0] for e in sse_events(resp) if e["choices"]] if stream else [resp.json()["choices"][0]]
    if path == "/v1/completions":
        return "".join(c[key] for c in items)
    return "".join(c[key].get("content") or "" for c in items)


def pd_fields(bootstrap_port: int, room: int, decode_rank: int, prefill_rank: int) -> tuple[dict, dict]:
    """The P/D fields of the prefill and the decode half, in the body as sglang-router sends them."""
    common = {"bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    return ({**common, "data_parallel_rank": prefill_rank},
            {**common, "data_parallel_rank": decode_rank, "disagg_prefill_dp_rank": prefill_rank})


def run_pairs(pair, halves: list[tuple[str, dict, dict]], timeout: float = 60) -> list[tuple[httpx.Response, httpx.Response]]:
    """Send every ``(path, prefill body, decode body)`` pair at once; the responses of each pair."""

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            async def one(path: str, prefill_body: dict, decode_body: dict):
                return await asyncio.gather(client.post(pair["prefill"].url + path, json=prefill_body),
                                            client.post(pair["decode"].url + path, json=decode_body))

            return await asyncio.gather(*(one(*h) for h in halves))

    return asyncio.run(main())


def expected_outputs(servers, pool, requests: list[tuple[str, dict]]) -> list[str | list[int]]:
    """The mixed server's non-streaming output for each ``(path, body)``."""
    futures = [pool.submit(post, servers["mixed"], body, None, path) for path, body in requests]
    outputs = [output_of(path, f.result(), False) for (path, _), f in zip(requests, futures)]
    assert all(outputs), outputs
    return outputs


def test_server_info_reports_roles(servers):
    for name, mode in (("prefill", "prefill"), ("decode", "decode"), ("mixed", "null")):
        info = httpx.get(servers[name].url + "/server_info", timeout=10).json()
        assert info["disaggregation_mode"] == mode
    info = httpx.get(servers["prefill"].url + "/server_info", timeout=10).json()
    assert info["disaggregation_bootstrap_port"] == servers["bootstrap_port"]
    assert info["load_balance_method"] == "follow_bootstrap_room"
    health = httpx.get(f"http://127.0.0.1:{servers['bootstrap_port']}/health", timeout=10)
    assert health.status_code == 200


def test_every_rank_pair_matches_mixed(servers, pool):
    """Decode rank i x prefill rank j, each pinned through a different spelling of the fields."""
    rng = random.Random(1)
    spellings = [
        (lambda i: ({"data_parallel_rank": i}, None), lambda j: {"disagg_prefill_dp_rank": j}),
        (lambda i: ({"routed_dp_rank": i}, None), lambda j: {"prefill_data_parallel_rank": j}),
        (lambda i: ({}, {"X-Data-Parallel-Rank": str(i)}), lambda j: {"disagg_prefill_dp_rank": j}),
    ]
    for i in range(3):
        for j in range(2):
            text = PROMPTS[(i + j) % len(PROMPTS)] + f" ({i}, {j})"
            expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY}).json()
            room = rng.randrange(2**63)
            decode_rank, prefill_rank = spellings[i]
            decode_fields, headers = decode_rank(i)
            p, d = pd_pair(servers, pool, room_body(servers, text, room), {"data_parallel_rank": j},
                           {**decode_fields, **prefill_rank(j)}, headers)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
            decoded, prefilled = d.json(), p.json()
            assert decoded["output_ids"] == expected["output_ids"] and decoded["text"] == expected["text"]
            assert prefilled["output_ids"] == expected["output_ids"][:1]
            meta = decoded["meta_info"]
            assert (meta["decode_dp_rank"], meta["prefill_dp_rank"], meta["bootstrap_room"]) == (i, j, room)
            assert meta["kv_transfer_bytes"] > 0 and meta["kv_wait_ms"] >= meta["kv_transfer_ms"] >= 0
            assert prefilled["meta_info"]["kv_transfer_bytes"] == meta["kv_transfer_bytes"]
            assert prefilled["meta_info"]["dp_rank"] == j
    assert_pages_freed(servers)


def test_64_concurrent_requests_over_random_pairs(servers, pool):
    rng = random.Random(64)
    texts = [f"{PROMPTS[k % len(PROMPTS)]} #{k}" for k in range(8)]
    expected = [r["output_ids"] for r in post(servers["mixed"], {"text": texts, "sampling_params": SHORT}).json()]
    halves, picks = [], []
    for n in range(64):
        i, j, k = rng.randrange(3), rng.randrange(2), rng.randrange(len(texts))
        p_fields, d_fields = pd_fields(servers["bootstrap_port"], 6000 + n, i, j)
        body = {"text": texts[k], "sampling_params": SHORT}
        halves.append(("/generate", {**body, **p_fields}, {**body, **d_fields}))
        picks.append((i, j, k))
    for (i, j, k), (p, d) in zip(picks, run_pairs(servers, halves)):
        assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
        assert d.json()["output_ids"] == expected[k], (i, j, k)
        assert (d.json()["meta_info"]["decode_dp_rank"], d.json()["meta_info"]["prefill_dp_rank"]) == (i, j)
    assert_pages_freed(servers)


def test_every_rank_pair_through_the_openai_routes(servers, pool):
    """Decode rank i x prefill rank j through /v1/completions and /v1/chat/completions, streamed and
    not, with the P/D fields in the body: the text equals the mixed server's."""
    cases = [(path, i, j, stream) for path in OPENAI_ROUTES for i in range(3) for j in range(2)
             for stream in (False, True)]
    text = {(i, j): f"{PROMPTS[(i + j) % len(PROMPTS)]} [{i}{j}]" for i in range(3) for j in range(2)}
    refs = sorted({(path, text[i, j]) for path, i, j, _ in cases})
    expected = dict(zip(refs, expected_outputs(servers, pool, [(p, openai_body(p, t)) for p, t in refs])))
    halves = []
    for n, (path, i, j, stream) in enumerate(cases):
        p_fields, d_fields = pd_fields(servers["bootstrap_port"], 7000 + n, i, j)
        body = openai_body(path, text[i, j], stream)
        halves.append((path, {**body, **p_fields}, {**body, **d_fields}))
    for (path, i, j, stream), (p, d) in zip(cases, run_pairs(servers, halves)):
        assert p.status_code == 200, p.text
        assert output_of(path, d, stream) == expected[path, text[i, j]], (path, i, j, stream)
    assert_pages_freed(servers)


def test_ranks_follow_the_room_without_pins(servers, pool):
    """Nothing pinned (as sglang-router sends): both servers derive prefill rank room % 2."""
    for room in (10, 11):
        text = f"Room {room} says hello"
        expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY}).json()
        p, d = pd_pair(servers, pool, room_body(servers, text, room), {}, {})
        assert d.json()["output_ids"] == expected["output_ids"], d.text
        assert d.json()["meta_info"]["prefill_dp_rank"] == p.json()["meta_info"]["dp_rank"] == room % 2
    assert_pages_freed(servers)


def test_streaming_and_logprobs(servers, pool):
    text = PROMPTS[1]
    expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY, "return_logprob": True}).json()
    body = {**room_body(servers, text, 424242), "return_logprob": True}
    p, d = pd_pair(servers, pool, body, {}, {"stream": True})
    chunks = [line for line in d.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    assert p.json()["meta_info"]["input_token_logprobs"]  # prefill computed the prompt's logprobs
    last = httpx.Response(200, content=chunks[-2][len("data: "):]).json()
    assert last["output_ids"] == expected["output_ids"]
    ours = [round(lp[0], 4) for lp in last["meta_info"]["output_token_logprobs"]]
    assert ours == [round(lp[0], 4) for lp in expected["meta_info"]["output_token_logprobs"]]
    # decode's answer is whole: prefill's input logprobs came in the KV transfer's Aux
    assert last["meta_info"]["input_token_logprobs"] == p.json()["meta_info"]["input_token_logprobs"]
    assert_pages_freed(servers)


def test_active_room_is_409(servers, pool):
    room = 777
    text = PROMPTS[2]
    first = pool.submit(post, servers["decode"], room_body(servers, text, room))
    assert wait_until(lambda: used_pages(servers["decode"]) > 0, 10)
    second = post(servers["decode"], room_body(servers, text, room))
    assert second.status_code == 409 and "bootstrap_room 777" in second.text
    assert post(servers["prefill"], room_body(servers, text, room)).status_code == 200
    assert first.result().json()["meta_info"]["finish_reason"]["type"] == "length"
    assert_pages_freed(servers)


def test_decode_without_prefill_fails_with_prefill_reason(servers):
    start = time.monotonic()
    resp = post(servers["decode"], room_body(servers, "Nobody prefills me", 31337))
    message = pd_failure(resp)
    assert time.monotonic() - start < WAITING_S + 5
    assert "received no prefill request for bootstrap_room 31337" in message
    assert_pages_freed(servers)


def test_decode_refuses_a_request_naming_no_kv_source(servers):
    """A decode server never computes a prompt it was meant to receive: a request with no room (what a
    router that takes the pair for vLLM servers sends) is a 400 naming what is missing, on every route, at
    once; a prefill rank without a room too. The server's own /health_generate probe still runs."""
    bodies = {"/generate": {"text": PROMPTS[0], "sampling_params": GREEDY},
              "/v1/completions": openai_body("/v1/completions", PROMPTS[0]),
              "/v1/chat/completions": openai_body("/v1/chat/completions", PROMPTS[0], stream=True)}
    for path, body in bodies.items():
        for extra in ({}, {"data_parallel_rank": 1}, {"disagg_prefill_dp_rank": 1}):
            start = time.monotonic()
            resp = post(servers["decode"], {**body, **extra}, path=path)
            assert resp.status_code == 400, (path, extra, resp.text)
            error = resp.json()["error"]
            assert error["param"] == "bootstrap_room", error
            assert ("names no KV source" if "disagg_prefill_dp_rank" not in extra else "no bootstrap_room") in error[
                "message"], error
            assert time.monotonic() - start < 5
    metrics = httpx.get(servers["decode"].url + "/metrics", timeout=10).text
    assert "pdserve:decode_local_prefills_total" in metrics and not any(
        line.startswith("pdserve:decode_local_prefills_total") and not line.endswith(" 0.0")
        for line in metrics.splitlines()), "a refused request was counted as computed locally"
    assert httpx.get(servers["decode"].url + "/health_generate", timeout=60).status_code == 200
    assert_pages_freed(servers)


def test_prefill_without_decode_frees_its_kv(servers):
    resp = post(servers["prefill"], room_body(servers, "Nobody decodes me", 31338))
    assert "no decode server sent a KV request for bootstrap_room 31338" in pd_failure(resp)
    assert_pages_freed(servers)


def test_decode_disconnect_reaches_prefill(servers):
    """The decode client goes away while waiting for KV: prefill learns at once and refuses the room."""
    room = 55555
    body = json.dumps({**room_body(servers, PROMPTS[0], room), "data_parallel_rank": 1}).encode()
    with socket.create_connection(("127.0.0.1", servers["decode"].port), timeout=10) as client:
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: used_pages(servers["decode"]) > 0, 10)
    assert wait_until(lambda: used_pages(servers["decode"]) == 0, 10)  # noticed the disconnect, aborted
    time.sleep(0.2)  # its Abort reaches prefill rank room % 2
    resp = post(servers["prefill"], room_body(servers, PROMPTS[0], room))
    # whichever word arrives first: decode rank 1's Abort on the control socket (503), or its front's
    # refusal posted to the bootstrap service with the client's 499; both name the room and the cause
    assert resp.status_code in (499, 503), resp.text
    message = resp.json()["error"]["message"]
    assert str(room) in message and "client disconnected" in message, message
    assert_pages_freed(servers)


def test_prefill_server_down_fails_within_the_bootstrap_timeout(servers):
    body = {**room_body(servers, PROMPTS[3], 999), "bootstrap_port": free_port()}
    start = time.monotonic()
    message = pd_failure(post(servers["decode"], body))
    assert time.monotonic() - start < 3 + 3
    assert f"127.0.0.1:{body['bootstrap_port']}" in message
    assert_pages_freed(servers)


def test_prefill_refusal_reaches_decode_at_once(servers, pool):
    """A prefill front that refuses a request naming a room makes decode's half fail at once with
    the refusal, whichever half comes first, instead of waiting out the waiting timeout."""
    refused = "the prefill server refused the request for bootstrap_room"
    bad = {**GREEDY, "temperature": -1}
    start = time.monotonic()
    p, d = pd_pair(servers, pool, room_body(servers, PROMPTS[0], 4100), {"sampling_params": bad}, {})
    assert p.status_code == 400, p.text
    message = pd_failure(d)
    assert time.monotonic() - start < 2
    assert f"prefill failed: {refused} 4100 with HTTP 400" in message and "temperature must be in [0, 100], got -1.0" in message

    late = pool.submit(post, servers["decode"], room_body(servers, PROMPTS[1], 4101))  # KV request waits first
    assert wait_until(lambda: used_pages(servers["decode"]) > 0, 10)
    time.sleep(0.3)
    start = time.monotonic()
    p = post(servers["prefill"], room_body(servers, PROMPTS[1], 4101, {**GREEDY, "bogus": 1}))
    assert p.status_code == 400 and "unsupported field: sampling_params.bogus" in p.text
    message = pd_failure(late.result())
    assert time.monotonic() - start < 2 and f"{refused} 4101" in message and "bogus" in message

    p = post(servers["prefill"], {**room_body(servers, PROMPTS[2], 4102), "data_parallel_rank": 5})
    assert p.status_code == 400  # an invalid rank: every rank learns of the room
    start = time.monotonic()
    message = pd_failure(post(servers["decode"], room_body(servers, PROMPTS[2], 4102)))
    assert time.monotonic() - start < 2 and "data_parallel_rank" in message

    openai = {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0, "bootstrap_host": "127.0.0.1",
              "bootstrap_port": servers["bootstrap_port"], "bootstrap_room": 4103}
    start = time.monotonic()
    p, d = (f.result() for f in (
        pool.submit(post, servers["prefill"], {**openai, "model": "no-such-model"}, None, "/v1/completions"),
        pool.submit(post, servers["decode"], openai, None, "/v1/completions"),
    ))
    assert p.status_code == 404, p.text
    assert d.status_code == 503 and "no-such-model" in d.json()["error"]["message"], d.text
    assert time.monotonic() - start < 2
    assert_pages_freed(servers)


def test_bad_pd_fields_are_400(servers):
    body = room_body(servers, "x", 1)
    del body["bootstrap_host"]
    resp = post(servers["decode"], body)
    assert resp.status_code == 400 and "bootstrap_host" in resp.text
    resp = post(servers["decode"], {**room_body(servers, "x", 1), "bootstrap_room": -5})
    assert resp.status_code == 400 and "bootstrap_room" in resp.text


def test_metrics_count_transfers_and_failures(servers):
    def metric(name: str, server: str) -> float:
        text = httpx.get(servers[server].url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    assert wait_until(lambda: metric("pdserve:kv_transfer_bytes_total", "decode") > 0, 5)
    assert metric("pdserve:kv_transfer_bytes_total", "prefill") > 0
    assert metric("pdserve:kv_transfer_latency_seconds_count", "decode") >= 6
    assert metric('pdserve:kv_transfer_failures_total{cause="waiting_timeout"', "prefill") >= 1
    assert "pdserve:disagg_rooms" in httpx.get(servers["decode"].url + "/metrics", timeout=10).text


@pytest.mark.parametrize("backend", ["tcp", "nixl", "mooncake"])
def test_prefill_killed_mid_request(tmp_path, pool, backend):
    """SIGKILL a prefill server while it computes a long prompt in small chunks: decode answers
    503 within its timeouts and frees every page."""
    bootstrap_port = free_port()
    flags = ["--disaggregation-transfer-backend", backend]
    prefill = launch(["--disaggregation-mode", "prefill", "--chunked-prefill-size", "4", *flags,
                      "--disaggregation-bootstrap-port", str(bootstrap_port), *COMMON, *PD_TIMEOUTS], tmp_path)
    decode = launch(["--disaggregation-mode", "decode", *flags, *COMMON, *PD_TIMEOUTS], tmp_path)
    try:
        prefill.wait_healthy()
        decode.wait_healthy()
        pair = {"prefill": prefill, "decode": decode, "bootstrap_port": bootstrap_port}
        body = {**room_body(pair, "", 8080), "text": None, "input_ids": [random.Random(8).randrange(1000)
                                                                         for _ in range(3500)]}
        doomed = pool.submit(post, prefill, body)
        waiting = pool.submit(post, decode, body)
        assert wait_until(lambda: used_pages(decode) > 0 and used_pages(prefill) > 0, 20)
        time.sleep(0.2)
        assert not waiting.done(), "the prefill finished before it could be killed"
        os.killpg(prefill.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        message = pd_failure(waiting.result())
        assert time.monotonic() - killed_at < 3 + 2, message
        assert "room 8080" in message
        with pytest.raises(httpx.HTTPError):
            doomed.result()
        assert wait_until(lambda: used_pages(decode) == 0, 10), "decode still holds KV pages"
        assert httpx.get(decode.url + "/health", timeout=5).status_code == 200
    finally:
        prefill.stop()
        decode.stop()


@contextlib.contextmanager
def sglang_router(pair, log_path):
    """sglang-router 0.3.2 in PD mode in front of ``pair``'s prefill and decode servers; its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--pd-disaggregation", "--prefill", pair["prefill"].url, str(pair["bootstrap_port"]),
           "--decode", pair["decode"].url, "--policy", "round_robin", "--log-level", "warn",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO_ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url + "/health", timeout=2).status_code == 200
        return False

    try:
        assert wait_until(up, 60, 0.3), log_path.read_text(errors="replace")[-3000:]
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    """sglang-router 0.3.2 in PD mode in front of the prefill and decode servers."""
    pytest.importorskip("sglang_router")
    with sglang_router(servers, tmp_path_factory.mktemp("router") / "router.log") as url:
        yield url


def test_through_sglang_router(servers, router):
    for text in PROMPTS[:2]:
        expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY}).json()
        resp = httpx.post(router + "/generate", json={"text": text, "sampling_params": GREEDY}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_ids"] == expected["output_ids"]
        assert resp.json()["meta_info"]["kv_transfer_bytes"] > 0
    completion = httpx.post(router + "/v1/completions", timeout=60,
                            json={"model": "tiny-llama-v1", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
    assert completion.status_code == 200, completion.text
    expected = post(servers["mixed"], {"model": "tiny-llama-v1", "prompt": PROMPTS[0], "max_tokens": 12,
                                       "temperature": 0}, path="/v1/completions").json()
    assert completion.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    assert_pages_freed(servers)


def test_through_sglang_router_chat_and_streaming(servers, router, pool):
    """/v1/chat/completions, and /generate, /v1/completions and /v1/chat/completions streamed,
    through sglang-router in PD mode: each equals the mixed server's greedy output."""
    text = PROMPTS[1]
    cases = [("/generate", {"text": text, "sampling_params": SHORT, "stream": True}, True)]
    cases += [(path, openai_body(path, text, stream), stream) for path in OPENAI_ROUTES for stream in (False, True)]
    cases = [c for c in cases if (c[0], c[2]) != ("/v1/completions", False)]  # covered above
    expected = expected_outputs(servers, pool, [(path, {**body, "stream": False}) for path, body, _ in cases])
    futures = [pool.submit(httpx.post, router + path, json=body, timeout=60) for path, body, _ in cases]
    for (path, _, stream), want, future in zip(cases, expected, futures):
        assert output_of(path, future.result(), stream) == want, (path, stream)
    assert_pages_freed(servers)


# ---------------------------------------------------------------- every byte-moving backend besides tcp
# One prefill DP 2 x decode DP 3 pair per backend (module-scoped, so pytest starts each pair once and
# runs every scenario below on it): the shared-memory backend and the two transfer engines.


@pytest.fixture(scope="module", params=["shm", "nixl", "mooncake"])
def engine_pair(request, tmp_path_factory):
    backend = request.param
    logs = tmp_path_factory.mktemp(f"pd-{backend}")
    bootstrap_port = free_port()
    flags = ["--disaggregation-transfer-backend", backend, "--disaggregation-bootstrap-port", str(bootstrap_port)]
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--chunked-prefill-size", "8", *flags,
                      *COMMON, *PD_TIMEOUTS], logs)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "3", *flags, *COMMON, *PD_TIMEOUTS], logs)
    try:
        prefill.wait_healthy()
        decode.wait_healthy()
        yield {"prefill": prefill, "decode": decode, "bootstrap_port": bootstrap_port, "backend": backend}
    finally:
        prefill.stop()
        decode.stop()


def test_backend_every_rank_pair_and_route(servers, engine_pair, pool):
    """Every rank pair through /generate, one through each OpenAI route streamed and not: the output
    equals the mixed server's."""
    pair = engine_pair
    info = httpx.get(pair["decode"].url + "/server_info", timeout=10).json()
    assert info["disaggregation_transfer_backend"] == pair["backend"]
    cases = [("/generate", {"text": f"{PROMPTS[i + j]} <{i}{j}>", "sampling_params": SHORT}, i, j, False)
             for i in range(3) for j in range(2)]
    cases += [(path, openai_body(path, PROMPTS[0], stream), 2, 1, stream)
              for path in OPENAI_ROUTES for stream in (False, True)]
    expected = expected_outputs(servers, pool, [(path, {**body, "stream": False}) for path, body, *_ in cases])
    halves = []
    for n, (path, body, i, j, _) in enumerate(cases):
        p_fields, d_fields = pd_fields(pair["bootstrap_port"], 1000 + n, i, j)
        halves.append((path, {**body, **p_fields}, {**body, **d_fields}))
    for (path, _, i, j, stream), want, (p, d) in zip(cases, expected, run_pairs(pair, halves)):
        assert p.status_code == 200, p.text
        assert output_of(path, d, stream) == want, (path, i, j, stream)
        if path == "/generate":
            assert d.json()["meta_info"]["kv_transfer_bytes"] > 0
            assert (d.json()["meta_info"]["decode_dp_rank"], d.json()["meta_info"]["prefill_dp_rank"]) == (i, j)
    assert_pages_freed(pair)


def test_backend_both_arrival_orders(servers, engine_pair, pool):
    """The prefill half well before the decode half, and the other way round."""
    pair = engine_pair
    for n, first in enumerate(("prefill", "decode")):
        text = f"{PROMPTS[n]} arriving {first} first"
        expected = post(servers["mixed"], {"text": text, "sampling_params": SHORT}).json()["output_ids"]
        p_fields, d_fields = pd_fields(pair["bootstrap_port"], 2000 + n, n, 1 - n)
        body = {"text": text, "sampling_params": SHORT}
        halves = {"prefill": {**body, **p_fields}, "decode": {**body, **d_fields}}
        early = pool.submit(post, pair[first], halves[first])
        # decode pre-allocates the room's pages at once; prefill holds a lone half queued (gated on
        # its decode half, no pages yet) and counts it waiting
        arrived = (lambda: waiting_reqs(pair["prefill"]) > 0) if first == "prefill" else (lambda: used_pages(pair["decode"]) > 0)
        assert wait_until(arrived, 10), f"the {first} half never showed up on its server"
        time.sleep(0.3)
        second = "decode" if first == "prefill" else "prefill"
        late = post(pair[second], halves[second])
        d = late if second == "decode" else early.result()
        p = early.result() if second == "decode" else late
        assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
        assert d.json()["output_ids"] == expected
    assert_pages_freed(pair)


def test_backend_decode_reuses_its_prefix(engine_pair):
    """A second prompt sharing a long prefix on the same decode rank: decode's prefix cache holds the
    shared pages, only the suffix's pages move, and the answer is unchanged."""
    pair = engine_pair
    prefix = [random.Random(24).randrange(1000) for _ in range(48)]
    sizes = []
    for n, suffix in enumerate(([7, 8, 9, 10, 11], [12, 13, 14, 15, 16])):
        p_fields, d_fields = pd_fields(pair["bootstrap_port"], 3000 + n, 1, 0)
        body = {"input_ids": prefix + suffix, "sampling_params": SHORT}
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            p = executor.submit(post, pair["prefill"], {**body, **p_fields})
            d = executor.submit(post, pair["decode"], {**body, **d_fields}).result()
        assert p.result().status_code == 200 and d.status_code == 200, d.text
        sizes.append((d.json()["meta_info"]["kv_transfer_bytes"], d.json()["meta_info"].get("decode_cached_tokens")))
    (first_bytes, first_cached), (second_bytes, second_cached) = sizes
    assert not first_cached and second_cached and second_cached >= 40, sizes
    assert 0 < second_bytes < first_bytes / 4, sizes  # 53 tokens: 14 pages sent at first, 2-3 once 48 are cached
    assert_pages_freed(pair)


def test_backend_decode_disconnect_reaches_prefill(engine_pair):
    """The decode client goes away while its KV request waits: prefill refuses the room's late half."""
    pair = engine_pair
    room = 4444
    body = json.dumps({**room_body(pair, PROMPTS[0], room), "data_parallel_rank": 2}).encode()
    with socket.create_connection(("127.0.0.1", pair["decode"].port), timeout=10) as client:
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: used_pages(pair["decode"]) > 0, 10)
    assert wait_until(lambda: used_pages(pair["decode"]) == 0, 10)
    time.sleep(0.2)
    resp = post(pair["prefill"], room_body(pair, PROMPTS[0], room))
    assert resp.status_code in (499, 503), resp.text
    assert "client disconnected" in resp.json()["error"]["message"]
    assert_pages_freed(pair)


def test_backend_through_sglang_router(servers, engine_pair, tmp_path):
    """sglang-router 0.3.2 in PD mode in front of the pair: /generate and a streamed chat completion."""
    pytest.importorskip("sglang_router")
    pair = engine_pair
    with sglang_router(pair, tmp_path / "router.log") as url:
        text = PROMPTS[2]
        expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY}).json()
        resp = httpx.post(url + "/generate", json={"text": text, "sampling_params": GREEDY}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_ids"] == expected["output_ids"]
        chat = openai_body("/v1/chat/completions", text, stream=True)
        mixed = post(servers["mixed"], {**chat, "stream": False}, path="/v1/chat/completions")
        want = output_of("/v1/chat/completions", mixed, False)
        got = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert output_of("/v1/chat/completions", got, True) == want
    assert_pages_freed(pair)
