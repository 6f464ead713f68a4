"""Prefix cache through a real server: cached_tokens on both APIs, /get_load and /metrics, the
/kv_events feed, and /flush_cache refusing while a request runs."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server_harness import launch, wait_until

PAGE = 16
PROMPT_IDS = [(7 * i) % 200 + 3 for i in range(50)]  # 3 full pages and 2 tokens
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch(
        ["--dp-size", "1", "--max-total-tokens", "2048", "--page-size", str(PAGE), "--chunked-prefill-size", "32",
         "--log-level", "warning"],
        tmp_path_factory.mktemp("prefix-cache-server"),
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


def events_since(client: httpx.Client, after: int, timeout: float = 0) -> dict:
    resp = client.get("/kv_events", params={"after": after, "timeout": timeout})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_cached_prefix_is_reported_everywhere_and_output_unchanged(server, client):
    first = client.post("/generate", json={"input_ids": PROMPT_IDS, "sampling_params": GREEDY}).json()
    second = client.post("/generate", json={"input_ids": PROMPT_IDS, "sampling_params": GREEDY}).json()
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 3 * PAGE
    assert second["output_ids"] == first["output_ids"]
    text = "A shared system prompt, long enough to fill more than one page of sixteen tokens: " * 3
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    runs = [oai.completions.create(model=oai.models.list().data[0].id, prompt=text + q, max_tokens=4, temperature=0) for q in "ab"]
    assert runs[0].usage.prompt_tokens_details.cached_tokens == 0
    assert runs[1].usage.prompt_tokens_details.cached_tokens >= PAGE
    (load,) = client.get("/get_load").json()
    assert load["num_cached_pages"] >= 3 and 0 < load["cache_hit_rate"] < 1
    assert load["num_used_pages"] == 0 and load["num_evictable_pages"] == load["num_cached_pages"]
    assert load["prefill_tokens_computed"] < load["prompt_tokens_total"]
    metrics = client.get("/metrics").text
    assert "sglang:cache_hit_rate{" in metrics and "pdserve:prefix_cache_pages{" in metrics
    feed = events_since(client, 0)
    stored = [e for b in feed["batches"] for e in b["events"] if e["type"] == "BlockStored"]
    assert stored and all(b["dp_rank"] == 0 for b in feed["batches"])
    assert stored[0]["token_ids"][:PAGE] == PROMPT_IDS[:PAGE] and stored[0]["block_size"] == PAGE


def test_kv_events_long_poll_and_bad_parameters(client):
    last = events_since(client, 0)["last_seq"]
    assert events_since(client, last, timeout=0.3)["batches"] == []  # waits, then answers empty
    for params, field in (({"timeout": "nan"}, "timeout"), ({"after": "-1"}, "after"), ({"after": "x"}, "after"),
                          ({"timeout": "1e9"}, "timeout")):
        resp = client.get("/kv_events", params=params)
        assert resp.status_code == 400 and field in resp.text


def test_flush_cache_refuses_while_a_request_runs_then_empties(client):
    started, answered = threading.Event(), threading.Event()

    def long_request() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as c, c.stream(
            "POST", "/generate",
            json={"input_ids": PROMPT_IDS, "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": 1500}},
        ) as resp:
            for _ in resp.iter_lines():
                started.set()
                answered.wait(60)  # stay in the engine until the flush has been answered
                break  # then leave: the server aborts the request

    last = events_since(client, 0)["last_seq"]
    worker = threading.Thread(target=long_request)
    worker.start()
    assert started.wait(60)
    try:
        refused = client.post("/flush_cache")
    finally:
        answered.set()
        worker.join(60)
    assert refused.status_code == 400 and "requests are in the engine" in refused.text
    assert wait_until(lambda: client.post("/flush_cache").status_code == 200, 30)
    (load,) = client.get("/get_load").json()
    assert load["num_cached_pages"] == 0 and load["num_used_pages"] == 0
    kinds = [e["type"] for b in events_since(client, last)["batches"] for e in b["events"]]
    assert "AllBlocksCleared" in kinds
