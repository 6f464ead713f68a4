"""``pdserve serve`` end to end: a real server (2 DP ranks, API key) driven with httpx and openai."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_harness import launch, wait_until

API_KEY = "test-key"
MAX_TOTAL_TOKENS = 2048
MAX_REQUEST_BYTES = 65536
TIMEOUT = httpx.Timeout(60.0)
PROMPTS = ["Hello world", "Once upon a time, in a small village", "def add(a, b):"]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = launch(
        ["--dp-size", "2", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--page-size", "16",
         "--chunked-prefill-size", "64", "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "warning"],
        tmp_path_factory.mktemp("server"),
        api_key=API_KEY,
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60.0, max_retries=0)


@pytest.fixture(scope="session")
def offline_engine():
    from pdserve import Engine

    engine = Engine(max_total_tokens=MAX_TOTAL_TOKENS, page_size=16, chunked_prefill_size=64)
    yield engine
    engine.shutdown()


def sse_events(response: httpx.Response) -> list:
    """Parsed ``data:`` events of an SSE response; the last must be [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def pages_in_use(client: httpx.Client) -> int:
    return sum(r["num_used_pages"] for r in client.get("/get_load").json())


def assert_idle(client: httpx.Client, timeout: float = 10.0) -> None:
    assert wait_until(lambda: pages_in_use(client) == 0, timeout), client.get("/get_load").json()


# ---------------------------------------------------------------------- info endpoints


def test_health_info_and_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path).json()
        assert Path(info["model_path"]).is_absolute() and Path(info["model_path"]).is_dir()
        assert info["tokenizer_path"] == info["model_path"]
        assert info["dp_size"] == 2 and info["tp_size"] == 1
        assert info["disaggregation_mode"] == "null"
        assert info["page_size"] == 16 and info["max_total_tokens"] == MAX_TOTAL_TOKENS
        assert info["context_length"] > 0 and info["version"]
        assert info["served_model_name"]
        assert info["dtype"] == info["compute_path"]["dtype"] == "float32"  # the embedded model under --dtype auto
        assert info["device"] == "cpu" and info["compute_path"]["native_attention"] in ("generic", "off")
    for path in ("/model_info", "/get_model_info"):
        model = client.get(path).json()
        assert model["is_generation"] is True and model["model_path"] == info["model_path"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["served_model_name"]
    load = client.get("/get_load").json()
    assert [r["dp_rank"] for r in load] == [0, 1]
    assert set(load[0]) >= {"num_reqs", "num_waiting_reqs", "num_tokens", "num_used_pages", "num_total_pages",
                            "num_retractions", "num_steps"}
    assert client.get("/health_generate").status_code == 200
    assert client.post("/flush_cache").status_code == 200


def test_api_key_required(server):
    assert httpx.post(server.url + "/generate", json={"text": "hi"}).status_code == 401
    resp = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.json()["error"]["message"]
    assert httpx.get(server.url + "/metrics").status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------------- /generate


def test_greedy_matches_offline_engine(client, offline_engine):
    params = {"max_new_tokens": 12, "temperature": 0}
    for prompt in PROMPTS:
        ours = client.post("/generate", json={"text": prompt, "sampling_params": params}).json()
        ref = offline_engine.generate(prompt, sampling_params=params)
        assert ours["output_ids"] == ref["output_ids"], prompt
        assert ours["text"] == ref["text"]
        assert ours["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]
        assert ours["meta_info"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
    ours = client.post("/generate", json={"text": PROMPTS[1], "sampling_params": params, "return_logprob": True}).json()
    ref = offline_engine.generate(PROMPTS[1], sampling_params=params, return_logprob=True)
    got = [lp for lp, _tok, _text in ours["meta_info"]["output_token_logprobs"]]
    want = [lp for lp, _tok, _text in ref["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_shapes_batch_and_input_ids(client):
    single = client.post("/generate", json={"input_ids": [1, 2, 3], "rid": "my-rid-1",
                                            "sampling_params": {"max_new_tokens": 4}}).json()
    meta = single["meta_info"]
    assert meta["id"] == "my-rid-1" and meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert len(single["output_ids"]) == 4 and isinstance(single["text"], str)
    for key in ("cached_tokens", "e2e_latency", "ttft", "dp_rank"):
        assert key in meta
    batch = client.post("/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 3}}).json()
    assert isinstance(batch, list) and len(batch) == 2
    assert all(item["meta_info"]["completion_tokens"] == 3 for item in batch)
    ids_batch = client.post("/generate", json={"input_ids": [[5, 6], [7, 8, 9]],
                                               "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert [r["meta_info"]["completion_tokens"] for r in ids_batch.json()] == [1, 2]


def test_router_fields_accepted(client):
    body = {
        "text": "Hello world", "model": None, "sampling_params": {"temperature": 0.0, "max_new_tokens": 4},
        "return_text_in_logprobs": False, "stream": False, "log_metrics": True, "return_hidden_states": False,
        "background": False, "no_logs": False, "return_bytes": False, "return_entropy": False,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": 18998, "bootstrap_room": 5470424843464133002,
    }
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta_info"]["completion_tokens"] == 4


def test_generate_stream(client):
    params = {"max_new_tokens": 8, "temperature": 0}
    full = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": params}).json()
    with client.stream("POST", "/generate", json={"text": PROMPTS[0], "sampling_params": params,
                                                  "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert len(events) >= 2
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["text"] == full["text"] and events[-1]["output_ids"] == full["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert all(full["text"].startswith(e["text"]) for e in events)  # cumulative


def test_batch_streams_interleave(client):
    body = {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 3}, {"max_new_tokens": 5}], "stream": True}
    with client.stream("POST", "/generate", json=body) as resp:
        events = sse_events(resp)
    last = {}
    for e in events:
        last[e["index"]] = e
    assert [last[i]["meta_info"]["completion_tokens"] for i in (0, 1)] == [3, 5]
    assert all(last[i]["meta_info"]["finish_reason"]["type"] == "length" for i in (0, 1))
    body = {"prompt": ["a", "b"], "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        chunks = sse_events(resp)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert_idle(client)


def test_logprobs_shape(client):
    resp = client.post("/generate", json={
        "text": "Hi there", "sampling_params": {"max_new_tokens": 3}, "return_logprob": True,
        "top_logprobs_num": 2, "return_text_in_logprobs": True, "logprob_start_len": 0,
    }).json()
    meta = resp["meta_info"]
    out = meta["output_token_logprobs"]
    assert len(out) == 3 and all(isinstance(lp, float) and isinstance(t, int) and isinstance(s, str)
                                 for lp, t, s in out)
    assert [t for _lp, t, _s in out] == resp["output_ids"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_top_logprobs"]) == 3 and all(len(row) == 2 for row in meta["output_top_logprobs"])


def test_stop_string_trimmed(client):
    base = client.post("/generate", json={"text": PROMPTS[1],
                                          "sampling_params": {"max_new_tokens": 24, "temperature": 0}}).json()
    text = base["text"]
    start = next(i for i in range(4, len(text) - 3) if text.find(text[i:i + 3]) == i and text[i:i + 3].strip())
    stop = text[start:start + 3]
    params = {"max_new_tokens": 24, "temperature": 0, "stop": [stop]}
    trimmed = client.post("/generate", json={"text": PROMPTS[1], "sampling_params": params}).json()
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert trimmed["text"] == text[:start]
    kept = client.post("/generate", json={"text": PROMPTS[1],
                                          "sampling_params": {**params, "no_stop_trim": True}}).json()
    assert kept["text"].startswith(text[:start] + stop)
    with client.stream("POST", "/generate", json={"text": PROMPTS[1], "sampling_params": params,
                                                  "stream": True}) as resp:
        events = sse_events(resp)
    assert events[-1]["text"] == text[:start]
    assert all(stop not in e["text"] for e in events)


# ---------------------------------------------------------------------- DP dispatch


def test_pinned_ranks(client):
    for rank in (0, 1):
        for body, headers in (
            ({"data_parallel_rank": rank}, {}),
            ({"routed_dp_rank": rank}, {}),
            ({}, {"X-Data-Parallel-Rank": str(rank)}),
        ):
            resp = client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}, **body},
                               headers=headers)
            assert resp.json()["meta_info"]["dp_rank"] == rank, (body, headers)
    ranks = {client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}})
             .json()["meta_info"]["dp_rank"] for _ in range(4)}
    assert ranks == {0, 1}  # round robin spreads unpinned requests


def test_get_load_follows_pinned_request(client):
    body = {"text": "Tell me", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True},
            "stream": True, "data_parallel_rank": 1}
    with client.stream("POST", "/generate", json=body) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["meta_info"]["dp_rank"] == 1
        load = client.get("/get_load").json()
        assert load[1]["num_reqs"] == 1 and load[1]["num_used_pages"] > 0
        assert load[0]["num_reqs"] == 0 and load[0]["num_used_pages"] == 0
    assert_idle(client)


# ---------------------------------------------------------------------- lifecycle of requests


def test_client_disconnect_frees_kv(server, client):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}, "stream": True}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=TIMEOUT) as own, \
            own.stream("POST", "/generate", json=body) as resp:
        seen = 0
        lines = resp.iter_lines()  # keep a reference: a dropped iterator closes the stream (a disconnect)
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break
        assert pages_in_use(client) > 0
    # 1800 tokens take several seconds here; the abort must free the pages well before
    assert wait_until(lambda: pages_in_use(client) == 0, 4.0), client.get("/get_load").json()
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/generate", json={**body, "stream": False}, headers=server.headers, timeout=0.5)
    assert wait_until(lambda: pages_in_use(client) == 0, 4.0), client.get("/get_load").json()


def test_abort_request(client):
    result = {}

    def run() -> None:
        result["resp"] = client.post("/generate", json={
            "text": "Hi", "rid": "abort-me", "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}})

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: pages_in_use(client) > 0, 10.0)
    assert client.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
    thread.join(20)
    meta = result["resp"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 1800
    assert_idle(client)


def test_rid_of_a_live_sample_is_refused_and_the_first_client_keeps_its_tokens(client, offline_engine):
    """Issue 22 case 3: a client rid ``x.s1`` beside a request ``x`` with n=2 left two live
    ``x.s1``, and the front handed the first client's handle to the sample (it got the other's
    tokens). The ids of a request and its samples are reserved together: the second request is
    refused naming the rid, whichever comes first, and the first stream is unharmed. The streams
    are long (1500 tokens) so that they are still live when the second request comes; each is
    read for its first 64 tokens, then dropped."""
    compare = 64
    ref = offline_engine.generate(PROMPTS[1], sampling_params={
        "max_new_tokens": compare, "min_new_tokens": compare, "temperature": 0})["output_ids"]
    long = {"max_new_tokens": 1500, "min_new_tokens": 1500, "temperature": 0}
    sample = {"max_new_tokens": 4, "n": 2, "temperature": 1.0, "seed": 5}

    def first_tokens(lines, count: int) -> dict:
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if len(event["output_ids"]) >= count:
                    return event
        raise AssertionError("the stream ended early")

    with client.stream("POST", "/generate", json={"text": PROMPTS[1], "rid": "x.s1", "stream": True,
                                                  "data_parallel_rank": 0, "sampling_params": long}) as resp:
        lines = resp.iter_lines()
        first_tokens(lines, 1)
        refused = client.post("/generate", json={"text": "Hi", "rid": "x", "data_parallel_rank": 0,
                                                 "sampling_params": sample})
        assert refused.status_code == 400, refused.text
        assert "'x.s1'" in refused.text and "rid" in refused.text
        event = first_tokens(lines, compare)
    assert event["output_ids"][:compare] == ref and event["meta_info"]["id"] == "x.s1"
    with client.stream("POST", "/generate", json={"text": "Hi", "rid": "y", "stream": True, "data_parallel_rank": 0,
                                                  "sampling_params": {**sample, **long}}) as resp:
        lines = resp.iter_lines()
        first_tokens(lines, 1)
        refused = client.post("/generate", json={"text": "Hi", "rid": "y.s1", "sampling_params": long})
        assert refused.status_code == 400 and "'y.s1'" in refused.text, refused.text
    assert_idle(client)


def test_a_rid_is_free_once_abort_request_answers(client):
    """Once ``/abort_request`` answers, the rid is free (the worker finishes the old internal id on
    its own), so a router retrying with the client's rid is not refused 400 ("already in use") by
    the server it just aborted."""
    long = {"max_new_tokens": 1800, "ignore_eos": True}
    for i in range(3):
        rid = f"reuse-me-{i}"
        thread = threading.Thread(target=client.post, args=("/generate",),
                                  kwargs={"json": {"text": "Hi", "rid": rid, "sampling_params": long}})
        thread.start()
        assert wait_until(lambda: pages_in_use(client) > 0, 10.0)
        assert client.post("/abort_request", json={"rid": rid}).json() == {"aborted": 1}
        again = client.post("/generate", json={"text": "Hi", "rid": rid, "sampling_params": {"max_new_tokens": 1}})
        assert again.status_code == 200, again.text
        thread.join(20)
    assert_idle(client)


def test_abort_by_a_batch_rid_never_hits_another_request(client):
    """``/abort_request`` with ``job`` aborts the request ``job`` or the items of the batch request
    ``job``; main aborted by prefix, so another client's request ``job-0`` died with it."""
    long = {"max_new_tokens": 1800, "ignore_eos": True}
    result = {}
    thread = threading.Thread(target=lambda: result.update(resp=client.post("/generate", json={
        "text": "Hi", "rid": "job-0", "sampling_params": long})))
    thread.start()
    assert wait_until(lambda: pages_in_use(client) > 0, 10.0)
    assert client.post("/abort_request", json={"rid": "job"}).json() == {"aborted": 0}
    assert client.post("/abort_request", json={"rid": "job-0"}).json() == {"aborted": 1}
    thread.join(20)
    assert result["resp"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    batch = {"text": ["Hi", "Hello"], "rid": "b", "sampling_params": long}
    thread = threading.Thread(target=lambda: result.update(batch=client.post("/generate", json=batch)))
    thread.start()
    assert wait_until(lambda: sum(r["num_reqs"] for r in client.get("/get_load").json()) == 2, 10.0)
    assert client.post("/abort_request", json={"rid": "b"}).json() == {"aborted": 1}
    thread.join(20)
    items = result["batch"].json()
    assert [item["meta_info"]["id"] for item in items] == ["b-0", "b-1"]
    assert all(item["meta_info"]["finish_reason"]["type"] == "abort" for item in items)
    assert_idle(client)


# ---------------------------------------------------------------------- OpenAI API


def test_openai_completions(oai, server):
    model = oai.models.list().data[0].id
    done = oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 5
    assert len(choice.logprobs.tokens) == 5 and len(choice.logprobs.top_logprobs[0]) == 2
    chunks = list(oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    chunks = list(oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    both = oai.completions.create(model=model, prompt=["a", "b"], max_tokens=2)
    assert sorted(c.index for c in both.choices) == [0, 1] and both.usage.completion_tokens == 4


def test_openai_chat(oai):
    model = oai.models.list().data[0].id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    done = oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, seed=1,
                                       logprobs=True, top_logprobs=2)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 6 and len(choice.logprobs.content) == 6
    stream = oai.chat.completions.create(model=model, messages=messages, max_completion_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == 6
    stopped = oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                          stop=[choice.message.content[2:5]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == choice.message.content[:2]


def test_openai_errors(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    model = oai.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=[], max_tokens=1)
    assert "messages" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt="hi", max_tokens=-1)
    assert "max_tokens" in str(err.value)


# ---------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("/generate", b"{not json", 400, "malformed JSON"),
    ("/generate", b"[1, 2]", 400, "object"),
    ("/generate", b"", 400, "empty"),
    ("/generate", {}, 400, "missing prompt"),
    ("/generate", {"text": 5}, 400, "text"),
    ("/generate", {"text": ""}, 400, "text is empty"),
    ("/generate", {"input_ids": []}, 400, "input_ids"),
    ("/generate", {"input_ids": [1, "a"]}, 400, "input_ids"),
    ("/generate", {"input_ids": [1, 2, 10**9]}, 400, "vocabulary"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**6}}, 400, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400, "temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400, "bogus"),
    ("/generate", {"text": "hi", "sampling_params": "x"}, 400, "sampling_params"),
    ("/generate", {"text": "hi", "data_parallel_rank": 2}, 400, "data_parallel_rank must be an integer in [0, 1]"),
    ("/generate", {"text": "hi", "data_parallel_rank": -1}, 400, "data_parallel_rank"),
    ("/generate", {"text": "hi", "data_parallel_rank": "one"}, 400, "data_parallel_rank"),
    ("/generate", {"text": "hi", "routed_dp_rank": 1.5}, 400, "routed_dp_rank"),
    ("/generate", {"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 10**6}}, 400, "max_new_tokens"),
    ("/generate", {"text": "x" * (MAX_REQUEST_BYTES + 10)}, 413, "exceeds the limit"),
    ("/generate", {"text": ["a", "b"], "rid": ["only-one"]}, 400, "rid"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "nope"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "--max-n"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", b"{", 400, "malformed JSON"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "alien", "content": "hi"}]}, 400, "alien"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
     400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "data_parallel_rank": 7},
     400, "data_parallel_rank"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_INPUTS)
def test_bad_input(client, path, body, status, needle):
    if isinstance(body, bytes):
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"], error
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}


ONE_VALIDATOR_CASES = [
    {"input_ids": []},
    {"input_ids": [1, 10**9]},
    {"input_ids": [1] * 4000},
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**6}},
    {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [10**9]}},
    {"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 21},
    {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5},
    {"input_ids": [1, 2], "sampling_params": {"top_p": 0}},
]


@pytest.mark.parametrize("body", ONE_VALIDATOR_CASES)
def test_server_and_offline_engine_share_one_validator(client, offline_engine, body):
    """Issue 22: one validator and one set of limits for every route and the offline engine: the
    same request gets the same message from both."""
    from pdserve.engine.request import RequestError

    resp = client.post("/generate", json=body)
    assert resp.status_code == 400, resp.text
    kwargs = {k: v for k, v in body.items() if k != "sampling_params"}
    with pytest.raises(RequestError) as err:
        offline_engine.generate(sampling_params=body.get("sampling_params"), **kwargs)
    assert str(err.value) in resp.json()["error"]["message"], (resp.text, str(err.value))


def test_bad_rank_header(client):
    resp = client.post("/generate", json={"text": "hi"}, headers={"X-Data-Parallel-Rank": "9"})
    assert resp.status_code == 400 and "X-Data-Parallel-Rank" in resp.json()["error"]["message"]


def test_still_serving_after_bad_input(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    resp = client.post("/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 2}})
    assert resp.status_code == 200
    assert_idle(client)
    assert sum(r["num_reqs"] for r in client.get("/get_load").json()) == 0


def test_metrics(server, client):
    client.post("/generate", json={"text": "metrics", "sampling_params": {"max_new_tokens": 3}})
    text = httpx.get(server.url + "/metrics").text
    for name in ("sglang:time_to_first_token_seconds_count", "sglang:inter_token_latency_seconds_count",
                 "sglang:e2e_request_latency_seconds_count", "sglang:prompt_tokens_total",
                 "sglang:generation_tokens_total", "sglang:num_running_reqs", "sglang:num_queue_reqs",
                 "sglang:token_usage", "pdserve:num_retractions", "pdserve:engine_steps"):
        assert name in text, name
    assert 'dp_rank="1"' in text
    ttft = [line for line in text.splitlines() if line.startswith("sglang:time_to_first_token_seconds_count")]
    assert float(ttft[0].rsplit(" ", 1)[1]) > 0
