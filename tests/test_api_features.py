"""Structured output, tool calls, parallel sampling and the field allow-list, end to end: a real
``pdserve serve`` driven with httpx and the ``openai`` package (P/D cases: test_api_pd.py)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server_harness import launch

TIMEOUT = httpx.Timeout(60.0)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch(["--max-total-tokens", "4096", "--page-size", "16", "--chunked-prefill-size", "64",
                  "--tool-call-parser", "hermes", "--log-level", "warning"], tmp_path_factory.mktemp("api"))
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60.0, max_retries=0)


# ---------------------------------------------------------------------- structured output


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_json_schema_validates(oai, seed):
    r = oai.chat.completions.create(
        model=oai.models.list().data[0].id, messages=[{"role": "user", "content": "Describe a person"}],
        max_tokens=200, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_guided_json_and_choice(oai):
    r = oai.completions.create(model=oai.models.list().data[0].id, prompt="Hello", max_tokens=200, seed=5,
                               extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = oai.completions.create(model=oai.models.list().data[0].id, prompt="Hello", max_tokens=20, seed=5,
                               extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].text in ("yes", "no", "maybe")


def test_json_schema_streaming_and_json_object(oai):
    model = oai.models.list().data[0].id
    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "json please"}], max_tokens=200, seed=7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "json"}], max_tokens=30,
                                    seed=7, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")  # a random model rarely closes free-form keys in 30 tokens
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,5}", r"(cat|dog)s? [A-Z][a-z]{1,6}\."])
def test_generate_regex_matches(client, pattern):
    for seed in (1, 2):
        r = client.post("/generate", json={"text": "Hi", "sampling_params": {
            "max_new_tokens": 40, "temperature": 1.0, "seed": seed, "regex": pattern}})
        assert r.status_code == 200, r.text
        out = r.json()
        assert re.fullmatch(pattern, out["text"]), out
        assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_generate_ebnf_and_json_schema(client):
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {
        "max_new_tokens": 20, "temperature": 1.0, "ebnf": 'root ::= "yes" | "no"'}})
    assert r.json()["text"] in ("yes", "no"), r.text
    r = client.post("/generate", json={"text": "Hi", "stream": True, "sampling_params": {
        "max_new_tokens": 200, "temperature": 1.0, "json_schema": json.dumps(SCHEMA)}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    jsonschema.validate(json.loads(events[-1]["text"]), SCHEMA)


def test_grammar_cut_short_by_max_tokens(client):
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {
        "max_new_tokens": 3, "temperature": 1.0, "json_schema": json.dumps(SCHEMA)}})
    assert r.json()["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("route,body,field", [
    ("/generate", {"text": "Hi", "sampling_params": {"regex": "("}}, "sampling_params"),
    ("/generate", {"text": "Hi", "sampling_params": {"regex": "[a&&b]"}}, "sampling_params"),
    ("/generate", {"text": "Hi", "sampling_params": {"json_schema": "{not json"}}, "sampling_params"),
    ("/generate", {"text": "Hi", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}, "sampling_params"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": "blah"}}}},
     "response_format"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "("}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_json": {}}, "guided_json"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
        "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_grammar_is_400_naming_field(client, route, body, field):
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err.get("param") == field or field in err["message"], err
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------- tool calls


def test_tool_choice_required(oai):
    model = oai.models.list().data[0].id
    for seed in (1, 2):
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=200, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_tool_choice_named_streaming_and_history(oai):
    model = oai.models.list().data[0].id
    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for c in stream:
        for d in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or d.id
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    args = json.loads(calls[0]["arguments"])
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    # the call and its result go back through the chat template
    r = oai.chat.completions.create(model=model, max_tokens=5, tools=[WEATHER_TOOL], tool_choice="none", messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ])
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 20


def test_hermes_parser_auto_on_plain_text(oai):
    r = oai.chat.completions.create(model=oai.models.list().data[0].id, messages=[{"role": "user", "content": "hi"}],
                                    tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=8, seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- no silent ignoring

ROUTER_GENERATE_DEFAULTS = {"model": None, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                            "return_hidden_states": False, "background": False, "no_logs": False,
                            "return_bytes": False, "return_entropy": False}
ROUTER_CHAT_DEFAULTS = {"logprobs": False, "stream": False, "no_stop_trim": False, "ignore_eos": False,
                        "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
                        "stream_reasoning": True, "return_hidden_states": False}


def test_router_and_bench_defaults_accepted(client):
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2},
                                       **ROUTER_GENERATE_DEFAULTS})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_completion_tokens": 2, **ROUTER_CHAT_DEFAULTS})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={  # SGLang's and vLLM's bench clients
        "model": None, "prompt": "Hi", "max_tokens": 2, "temperature": 0.0, "best_of": 1, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, "logprobs": None, "echo": False,
        "return_hidden_states": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route,extra,field", [
    ("/generate", {"return_hidden_states": True}, "return_hidden_states"),
    ("/generate", {"lora_path": "x"}, "lora_path"),
    ("/generate", {"bogus": 1}, "bogus"),
    ("/generate", {"sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"stream_options": {"bogus": True}}, "stream_options.bogus"),
    ("/generate", {"return_routed_experts": True}, "return_routed_experts"),
    ("/v1/chat/completions", {"kv_transfer_params": {"bogus": True}}, "kv_transfer_params.bogus"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"tpo_p": 0.5}, "tpo_p"),
])
def test_unsupported_field_is_400(client, route, extra, field):
    base = {"/generate": {"text": "Hi"}, "/v1/completions": {"prompt": "Hi"},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]}}[route]
    r = client.post(route, json={**base, "max_tokens": 2, **extra} if route != "/generate" else {**base, **extra})
    assert r.status_code == 400, r.text
    assert f"unsupported field: {field}" in r.text, r.text


def test_unsupported_field_via_openai_sdk(oai):
    with pytest.raises(openai.BadRequestError, match="unsupported field: logit_bias"):
        oai.completions.create(model=oai.models.list().data[0].id, prompt="Hi", max_tokens=2, logit_bias={"5": 1})


# ---------------------------------------------------------------------- parallel sampling


def _stream_texts(stream) -> tuple[dict[int, str], object]:
    texts: dict[int, str] = {}
    usage = None
    for c in stream:
        usage = c.usage or usage
        for ch in c.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] = texts.get(ch.index, "") + piece
    return texts, usage


def test_n_completions_seeded_reproducible(oai):
    model = oai.models.list().data[0].id
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=12, n=3, seed=11, temperature=1.0)
    first = oai.completions.create(**kwargs)
    again = oai.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3, texts
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    prompt_tokens = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=1).usage.prompt_tokens
    assert first.usage.prompt_tokens == prompt_tokens
    assert first.usage.completion_tokens == 36
    streamed, usage = _stream_texts(oai.completions.create(**kwargs, stream=True,
                                                           stream_options={"include_usage": True}))
    assert [streamed[i] for i in range(3)] == texts
    assert usage.completion_tokens == 36
    # sample 0 with seed s is what n=1 with seed s gives
    single = oai.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].text == texts[0]


def test_n_chat_streaming_and_json_schema(oai):
    model = oai.models.list().data[0].id
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=200, n=3, seed=4,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    r = oai.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) == 3
    streamed, _ = _stream_texts(oai.chat.completions.create(**kwargs, stream=True))
    assert [streamed[i] for i in range(3)] == texts


def test_generate_batch_of_n(client):
    body = {"text": ["Hello", "The sky"], "sampling_params": {"max_new_tokens": 6, "n": 2, "seed": 3}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 4 and all(o["meta_info"]["completion_tokens"] == 6 for o in out)
    assert out[0]["text"] != out[1]["text"] and out[2]["text"] != out[3]["text"]
    r = client.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 6, "n": 2, "seed": 3}})
    assert [o["text"] for o in r.json()] == [o["text"] for o in out[:2]]
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {"n": 17}})
    assert r.status_code == 400 and "--max-n" in r.text
    r = client.post("/v1/completions", json={"prompt": "Hi", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    # greedy n: identical samples, allowed
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4, "n": 3,
                                                                         "temperature": 0}})
    assert len({o["text"] for o in r.json()}) == 1
    assert sum(x["num_used_pages"] for x in client.get("/get_load").json()) == 0


# ---------------------------------------------------------------------- the first hour


def test_rank_headers_fields_tokenize(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.headers["X-Decode-DP-Rank"] == "0" and r.json()["decode_dp_rank"] == 0
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}, "stream": True})
    assert r.headers["X-Decode-DP-Rank"] == "0"
    ids = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] > 0
    text = client.post("/detokenize", json={"tokens": ids["tokens"], "skip_special_tokens": True}).json()["prompt"]
    assert text.strip() == "Hello world"
    r = client.post("/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    model = client.get("/v1/models").json()["data"][0]
    assert model["root"] and model["id"]
