"""P/D end to end with real ``pdserve serve`` processes: a prefill server (DP 2), a decode server
(DP 3) and a mixed server for reference; every rank pair, the request-field spellings, failures
reaching the other side, 409, metrics, and sglang-router 0.3.2 in PD mode in front of them."""

from __future__ import annotations

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
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "3", "--disaggregation-waiting-timeout", "4",
               "--disaggregation-transfer-timeout", "5"]
GREEDY = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0}
PROMPTS = ["The history of the world in a few words", "Once upon a time, in a small village by the sea",
           "def add(a, b):", "Hello"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-logs")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--chunked-prefill-size", "8",
                      "--disaggregation-bootstrap-port", str(bootstrap_port), *COMMON, *PD_TIMEOUTS], logs)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "3", *COMMON, *PD_TIMEOUTS], logs)
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


def assert_pages_freed(servers) -> None:
    for name in ("prefill", "decode"):
        assert wait_until(lambda n=name: used_pages(servers[n]) == 0, 10), f"{name} still holds KV pages"


def pd_failure(resp: httpx.Response) -> str:
    """A failed pairing answers 503 (so a router may retry with a fresh pair); returns the message."""
    assert resp.status_code == 503, resp.text
    return resp.json()["error"]["message"]


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
    assert time.monotonic() - start < 4 + 5
    assert "received no prefill request for bootstrap_room 31337" in message
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
    message = pd_failure(resp)
    assert f"decode rank 1 aborted room {room}" in message and "client disconnected" in message
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
    assert f"prefill failed: {refused} 4100 with HTTP 400" in message and "temperature must be >= 0" in message

    late = pool.submit(post, servers["decode"], room_body(servers, PROMPTS[1], 4101))  # KV request waits first
    assert wait_until(lambda: used_pages(servers["decode"]) > 0, 10)
    time.sleep(0.3)
    start = time.monotonic()
    p = post(servers["prefill"], room_body(servers, PROMPTS[1], 4101, {**GREEDY, "bogus": 1}))
    assert p.status_code == 400 and "unknown sampling parameter 'bogus'" in p.text
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


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    """sglang-router 0.3.2 in PD mode in front of the prefill and decode servers."""
    pytest.importorskip("sglang_router")
    port = free_port()
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--pd-disaggregation", "--prefill", servers["prefill"].url, str(servers["bootstrap_port"]),
           "--decode", servers["decode"].url, "--policy", "round_robin", "--log-level", "warn",
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


def test_shm_backend_end_to_end(servers, pool, tmp_path):
    """The same flow with the shared-memory backend: prefill processes write into the decode pool."""
    bootstrap_port = free_port()
    shm = ["--disaggregation-transfer-backend", "shm", "--disaggregation-bootstrap-port", str(bootstrap_port)]
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "1", *shm, *COMMON, *PD_TIMEOUTS], tmp_path)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "2", *shm, *COMMON, *PD_TIMEOUTS], tmp_path)
    try:
        prefill.wait_healthy()
        decode.wait_healthy()
        pair = {"prefill": prefill, "decode": decode, "bootstrap_port": bootstrap_port}
        for i, text in enumerate(PROMPTS[:2]):
            expected = post(servers["mixed"], {"text": text, "sampling_params": GREEDY}).json()
            p, d = pd_pair(pair, pool, room_body(pair, text, 1000 + i), {}, {"data_parallel_rank": i})
            assert d.json()["output_ids"] == expected["output_ids"], (p.text, d.text)
            assert d.json()["meta_info"]["kv_transfer_bytes"] > 0
        assert_pages_freed(pair)
    finally:
        prefill.stop()
        decode.stop()
