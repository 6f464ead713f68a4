"""Code a request supplies (issue 22 case 4): a chat template in ``chat_template_kwargs`` is
refused with a 400 naming the field and the flag unless the server runs with
``--trust-request-chat-template``; then it renders on its own thread within a deadline and an
output cap, and another client's stream keeps its pace meanwhile."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from tests.server_harness import launch

TIMEOUT = httpx.Timeout(60.0)
FIELD = "chat_template_kwargs.chat_template"
# produces no output, so only the deadline stops it (1e10 iterations)
SILENT_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
LOUD_LOOP = "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}"  # the issue's
OWN_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
MESSAGES = [{"role": "user", "content": "Hello there"}]


def chat(client: httpx.Client, template: str | None, max_tokens: int = 4) -> httpx.Response:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    if template is not None:
        body["chat_template_kwargs"] = {"chat_template": template}
    return client.post("/v1/chat/completions", json=body)


def serve(tmp_path_factory, *flags: str):
    srv = launch(["--max-total-tokens", "4096", "--page-size", "16", "--log-level", "warning", *flags],
                 tmp_path_factory.mktemp("templates"))
    srv.wait_healthy()
    return srv


@pytest.fixture(scope="module")
def untrusting(tmp_path_factory):
    srv = serve(tmp_path_factory)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            yield client
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def trusting(tmp_path_factory):
    srv = serve(tmp_path_factory, "--trust-request-chat-template")
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            yield client
    finally:
        srv.stop()


def test_request_template_is_refused_by_default_naming_field_and_flag(untrusting):
    for template in (LOUD_LOOP, OWN_TEMPLATE):
        resp = chat(untrusting, template)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert FIELD in error["message"] and "--trust-request-chat-template" in error["message"], error
        assert error.get("param") == FIELD, error
    assert chat(untrusting, None).status_code == 200  # the checkpoint's own template is the operator's code
    assert chat(untrusting, "default").status_code == 200  # so is naming it


def test_trusted_request_template_renders(trusting):
    resp = chat(trusting, OWN_TEMPLATE, max_tokens=2)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] > 0


def stream_gaps(base_url: str, during=None) -> list[float]:
    """Seconds between the events of a 400-token stream; ``during()`` runs once it has started."""
    stamps: list[float] = []

    def stream() -> None:
        body = {"text": "Once upon a time", "stream": True,
                "sampling_params": {"max_new_tokens": 400, "min_new_tokens": 400, "temperature": 0}}
        with httpx.Client(base_url=base_url, timeout=TIMEOUT) as c, c.stream("POST", "/generate", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.monotonic())

    streamer = threading.Thread(target=stream)
    streamer.start()
    deadline = time.monotonic() + 30
    while len(stamps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stamps, "the stream did not start"
    if during is not None:
        during()
    streamer.join(60)
    assert len(stamps) > 100
    return [b - a for a, b in zip(stamps, stamps[1:])]


def test_hostile_template_meets_its_deadline_while_another_stream_keeps_its_pace(trusting):
    """Three hostile templates (each burns its whole 2 s deadline) while a stream runs: each gets a
    400 naming the field, an ordinary chat is not queued behind them, and the stream's gap between
    two events stays under 1 s (or, on a machine too loaded for that even without them, within
    twice its gap without them)."""
    base_url = str(trusting.base_url)
    assert chat(trusting, OWN_TEMPLATE, max_tokens=1).status_code == 200  # the template process is up
    baseline = max(stream_gaps(base_url))
    results: list[httpx.Response] = []
    timing: dict[str, float] = {}

    def attack() -> None:
        def hostile() -> None:
            with httpx.Client(base_url=base_url, timeout=TIMEOUT) as c:
                results.append(chat(c, SILENT_LOOP))

        attackers = [threading.Thread(target=hostile) for _ in range(3)]
        started = time.monotonic()
        for t in attackers:
            t.start()
        time.sleep(0.2)
        timing["ordinary"] = (chat(trusting, None), time.monotonic() - started)  # type: ignore[assignment]
        for t in attackers:
            t.join(30)
        timing["hostile"] = time.monotonic() - started

    gaps = stream_gaps(base_url, attack)
    ordinary, ordinary_s = timing["ordinary"]  # type: ignore[misc]
    print(f"\n3 hostile templates refused after {timing['hostile']:.1f} s; an ordinary chat took {ordinary_s:.2f} s; "
          f"longest stream gap {max(gaps) * 1000:.0f} ms ({baseline * 1000:.0f} ms without them)")
    assert ordinary.status_code == 200, ordinary.text
    assert len(results) == 3
    for resp in results:
        assert resp.status_code == 400, resp.text
        assert FIELD in resp.text and "did not render within" in resp.text
    assert ordinary_s < 4.0  # queued behind the three renders it would take more than 6 s
    assert max(gaps) < max(1.0, 2 * baseline), (max(gaps), baseline)


def test_renderer_caps_what_one_operation_builds():
    from pdserve.models.tokenizer import TemplateLimitError, render_request_template

    for source in ("{{ 'x' * 10**9 }}", "{{ 'x'|center(10**9) }}", "{{ '{:>1000000000}'.format(1) }}",
                   "{{ '%1000000000d' % 1 }}", "{% set a = [1] * 10**8 %}", LOUD_LOOP):
        with pytest.raises(TemplateLimitError):
            render_request_template(source, {}, deadline_s=5.0, max_chars=100_000)
    assert render_request_template(OWN_TEMPLATE, {"messages": MESSAGES}, 5.0, 100_000) == \
        "[user] Hello there\n[assistant]"
    assert json.loads(render_request_template("{{ messages|tojson }}", {"messages": MESSAGES}, 5.0, 100_000)) == MESSAGES


def test_a_child_past_its_deadline_is_killed_and_replaced():
    """The backstop for what the renderer's own caps miss (one long C-level operation): the child
    is killed at the deadline plus the grace period, and the next job gets a fresh child."""
    import asyncio
    import operator

    from pdserve.server.request_code import RequestCodeRunner, RequestCodeTimeout

    async def scenario() -> None:
        runner = RequestCodeRunner(grace_s=0.0)
        try:
            first = await runner.run(5.0, os.getpid)
            with pytest.raises(RequestCodeTimeout):
                await runner.run(0.05, time.sleep, 600)  # stands in for a job that ignores its deadline
            assert await runner.run(5.0, operator.add, 2, 3) == 5
            assert await runner.run(5.0, os.getpid) != first
        finally:
            runner.close()

    asyncio.run(scenario())
