"""The request-field tables of ``pdserve/request_bodies.py`` walked against a real mixed server:
every field of SGLang's and vLLM's surface that pdserve does not implement is accepted at each of
its "off" values (and changes nothing), refused with a 400 naming it at an "on" value; the bodies
the benchmark clients send are accepted; vLLM's ``continuous_usage_stats`` is honoured."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from pdserve.request_bodies import (
    HONOURED,
    OFF_VALUES,
    SAMPLING_PARAMS,
    TABLES,
    is_off,
    request_schema,
)
from tests.server_harness import launch

TIMEOUT = httpx.Timeout(60.0)
PATHS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
BASES: dict[str, dict[str, Any]] = {
    "generate": {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}},
    "completions": {"prompt": "Hello", "max_tokens": 2, "temperature": 0},
    "chat": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0},
}


def on_value(allowed: tuple[Any, ...]) -> Any:
    """A value that is not "off" for a field whose off values are ``allowed``."""
    return next(v for v in (True, 7, "on", {"on": 1}, ["on"]) if not is_off(v, allowed))


def answer_text(route: str, body: dict[str, Any]) -> str:
    if route == "generate":
        return body["text"]
    choice = body["choices"][0]
    return choice["text"] if route == "completions" else choice["message"]["content"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = launch(["--max-total-tokens", "4096", "--page-size", "16", "--log-level", "warning"],
                 tmp_path_factory.mktemp("fields"))
    try:
        srv.wait_healthy()
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            yield c
    finally:
        srv.stop()


def test_tables_name_sources_and_keep_honoured_and_off_apart():
    for name, table in {**TABLES, "sampling_params": SAMPLING_PARAMS}.items():
        assert table.sources and all(table.sources), name
        assert not table.honoured & table.off.keys(), (name, sorted(table.honoured & table.off.keys()))
        for field, values in table.off.items():
            assert values and None in values, (name, field)  # null is always "not set"


def test_off_values_match_by_type():
    assert is_off(False, (None, False)) and not is_off(0, (None, False))
    assert is_off(1, (None, 1.0)) and not is_off(True, (None, 1))
    assert is_off([], (None, [])) and not is_off(["x"], (None, []))


def test_published_schema_takes_each_off_value_and_refuses_an_on_value():
    for route, off in OFF_VALUES.items():
        validator = jsonschema.Draft202012Validator(request_schema(route))
        for field, values in off.items():
            top, _, child = field.partition(".")
            for value in values:
                body = {**BASES[route], top: {child: value} if child else value}
                if value is None and validator.is_valid({**BASES[route], top: None}) is False:
                    continue  # a typed field that does not take null (the server says so too)
                assert validator.is_valid(body), (route, field, value)
            assert not validator.is_valid({**BASES[route], field: on_value(values)}), (route, field)


@pytest.mark.parametrize("route", list(PATHS))
def test_every_off_value_is_accepted_and_changes_nothing(client, route):
    path = PATHS[route]
    baseline = client.post(path, json=BASES[route])
    assert baseline.status_code == 200, baseline.text
    expected = answer_text(route, baseline.json())
    for field, values in OFF_VALUES[route].items():
        for value in values:
            r = client.post(path, json={**BASES[route], field: value})
            if r.status_code == 400 and value is None and f"$.{field}" in r.text:
                continue  # a typed field (e.g. echo: bool) that takes no null: a type error naming it
            assert r.status_code == 200, (field, value, r.text)
            assert answer_text(route, r.json()) == expected, (field, value)


@pytest.mark.parametrize("route", list(PATHS))
def test_every_on_value_is_a_400_naming_the_field(client, route):
    for field, values in OFF_VALUES[route].items():
        value = on_value(values)
        r = client.post(PATHS[route], json={**BASES[route], field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert f"unsupported field: {field}" in r.text, (field, r.text)


def test_sampling_params_off_values_accepted_on_values_refused(client):
    base = BASES["generate"]
    expected = client.post("/generate", json=base).json()["text"]
    for field, values in SAMPLING_PARAMS.off.items():
        for value in values:
            r = client.post("/generate", json={**base, "sampling_params": {**base["sampling_params"], field: value}})
            assert r.status_code == 200 and r.json()["text"] == expected, (field, value, r.text)
        r = client.post("/generate", json={**base, "sampling_params": {**base["sampling_params"],
                                                                       field: on_value(values)}})
        assert r.status_code == 400 and f"unsupported field: sampling_params.{field}" in r.text, (field, r.text)


def test_unknown_stream_options_key_is_a_400(client):
    r = client.post("/v1/completions", json={**BASES["completions"], "stream": True,
                                             "stream_options": {"include_usage": True, "bogus": True}})
    assert r.status_code == 400 and "unsupported field: stream_options.bogus" in r.text, r.text


# What the clients send, recorded from their sources: SGLang bench_serving 0.5.23 (--backend sglang,
# sglang.benchmark.serving.async_request_sglang_generate) and guidellm 0.8.1
# (guidellm/backends/openai/request_handlers.py, text completions and chat with output_tokens set).
BENCH_SERVING_GENERATE = {
    "text": "Hello", "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True},
    "stream": True, "lora_path": None, "return_logprob": False, "return_routed_experts": False,
    "logprob_start_len": -1,
}
GUIDELLM_COMPLETIONS = {
    "prompt": "Hello", "model": None, "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_tokens": 4, "stop": None, "ignore_eos": True,
}
GUIDELLM_CHAT = {
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "model": None, "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_completion_tokens": 4, "stop": None, "ignore_eos": True,
}


def sse_events(r: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", r.text
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path,body", [("/generate", BENCH_SERVING_GENERATE),
                                       ("/v1/completions", GUIDELLM_COMPLETIONS),
                                       ("/v1/chat/completions", GUIDELLM_CHAT)],
                         ids=["bench_serving-generate", "guidellm-completions", "guidellm-chat"])
def test_benchmark_client_bodies_stream(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    events = sse_events(r)
    assert events and "error" not in events[-1], events[-1:]


@pytest.mark.parametrize("path,body", [("/v1/completions", {**GUIDELLM_COMPLETIONS, "max_tokens": 6}),
                                       ("/v1/chat/completions", {**GUIDELLM_CHAT, "max_completion_tokens": 6})],
                         ids=["completions", "chat"])
def test_continuous_usage_stats_puts_the_usage_so_far_on_every_chunk(client, path, body):
    events = sse_events(client.post(path, json=body))
    with_choices = [e for e in events if e["choices"]]
    assert all("usage" in e for e in with_choices), with_choices
    counts = [e["usage"]["completion_tokens"] for e in with_choices]
    assert counts == sorted(counts) and counts[-1] == 6, counts
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in with_choices)
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6  # include_usage's own chunk


def test_continuous_usage_stats_without_include_usage_adds_nothing(client):
    events = sse_events(client.post("/v1/completions", json={
        **BASES["completions"], "stream": True, "stream_options": {"continuous_usage_stats": True}}))
    assert events and all("usage" not in e for e in events), events


def test_honoured_nested_keys_are_the_stream_options_pair():
    for route in ("completions", "chat"):
        assert {n for n in HONOURED[route] if "." in n} == {"stream_options.include_usage",
                                                            "stream_options.continuous_usage_stats"}
