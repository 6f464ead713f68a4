"""SMG 1.13.0 (the Shepherd Model Gateway, ``smg`` on PyPI: sglang-router's successor) in PD mode in front
of a pdserve prefill server (DP 2) and decode server (DP 3), with a mixed server for reference.

SMG classifies workers by probing ``/v1/models`` (``owned_by``), ``/version`` and ``/server_info``; pdserve
must come out as an SGLang backend, so SMG injects the bootstrap fields and sends both legs at once (a vLLM
backend gets ``max_tokens: 1`` and no room, which a decode server now refuses). With ``--dp-aware`` SMG picks
both ranks itself (``routed_dp_rank`` on each leg, ``disagg_prefill_dp_rank`` on decode): each test reads
SMG's own choice from its debug log (keyed by the ``X-Request-Id`` the test sends) and checks that exactly
those ranks served, in ``meta_info`` and in the decode server's access log, with KV bytes moved. Every answer
equals the mixed server's greedy one. One server trio for the module; each SMG config starts once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import REPO_ROOT, free_port, launch, wait_until

COMMON = ["--torch-threads", "1", "--page-size", "4", "--max-total-tokens", "4096", "--log-level", "info"]
PD_TIMEOUTS = ["--disaggregation-bootstrap-timeout", "5", "--disaggregation-waiting-timeout", "20",
               "--disaggregation-transfer-timeout", "5"]
MODEL = "tiny-llama-v1"
TOKENS = 8
SMG_STARTUP_S = 60
# SMG's debug line for each request: "request_id="ID"}: ... PD selected DP ranks prefill=Some(P) decode=Some(D)"
CHOICE = re.compile(r'request_id="([^"]+)".*PD selected DP ranks prefill=Some\((\d+)\) decode=Some\((\d+)\)')
ACCESS = re.compile(r"pdserve\.access: POST (\S+) 200 rid=\S+ room=(\d+) prefill_rank=(\d+) decode_rank=(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def smg_command() -> list[str]:
    """SMG 1.13.0 run as ``python -m smg``: sglang-router 0.3.2 installs a ``smg`` console script too (its
    own gateway, 0.3.2), so which one ``bin/smg`` is depends on install order."""
    try:
        version = importlib.metadata.version("smg")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != "1.13.0":
        message = f"smg 1.13.0 is not installed (found {version}): pip install -e '.[test]'"
        if os.environ.get("PDSERVE_REQUIRE_CLIENTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return [sys.executable, "-m", "smg"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("smg-pd-logs")
    bootstrap_port = free_port()
    prefill = launch(["--disaggregation-mode", "prefill", "--dp-size", "2", "--disaggregation-bootstrap-port",
                      str(bootstrap_port), *COMMON, *PD_TIMEOUTS], logs)
    decode = launch(["--disaggregation-mode", "decode", "--dp-size", "3", *COMMON, *PD_TIMEOUTS], logs)
    mixed = launch(COMMON, logs)
    try:
        for server in (prefill, decode, mixed):
            server.wait_healthy()
        yield {"prefill": prefill, "decode": decode, "mixed": mixed, "bootstrap_port": bootstrap_port}
    finally:
        for server in (prefill, decode, mixed):
            server.stop()


class Gateway:
    """One ``smg launch --pd-disaggregation`` process (debug log: SMG's rank choice per request)."""

    def __init__(self, name: str, servers: dict, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"smg-{name}-{self.port}.log"
        cmd = [*smg_command(), "launch", "--host", "127.0.0.1", "--port", str(self.port), "--pd-disaggregation",
               "--prefill", servers["prefill"].url, str(servers["bootstrap_port"]), "--decode", servers["decode"].url,
               "--dp-aware", "--log-level", "debug", "--prometheus-host", "127.0.0.1",
               "--prometheus-port", str(free_port()), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO_ROOT, start_new_session=True)

    def log(self) -> str:
        return ANSI.sub("", self.log_path.read_text(errors="replace"))

    def workers(self) -> list[dict]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(self.url + "/workers", timeout=2).json()["workers"]
        return []

    def wait_ready(self) -> None:
        """Healthy, with all five DP workers (url@rank) registered as SGLang backends."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            workers = self.workers()
            return len(workers) == 5 and all(w.get("status") == "ready" for w in workers)

        if not wait_until(ready, SMG_STARTUP_S, 0.3):
            seen = [(w.get("url"), w.get("runtime_type"), w.get("status"), w.get("is_healthy")) for w in self.workers()]
            pytest.fail(f"smg {self.name}: expected 5 ready sglang DP workers (URL@rank) within {SMG_STARTUP_S} s, "
                        f"registered {seen} (a worker taken for vllm gets no DP discovery)\n{self.log()[-2000:]}")

    def choice(self, request_id: str) -> tuple[int, int]:
        """(prefill rank, decode rank) SMG's dp_rank policy picked for ``request_id``, from its log."""
        found: list[tuple[int, int]] = []

        def logged() -> bool:
            found[:] = [(int(m[2]), int(m[3])) for m in CHOICE.finditer(self.log()) if m[1] == request_id]
            return bool(found)

        assert wait_until(logged, 5), f"smg {self.name} logged no rank choice for request {request_id}"
        assert len(set(found)) == 1, found
        return found[0]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def gateways(servers, tmp_path_factory):
    """SMG with cache_aware (its tokenizer loaded from the absolute model_path the servers report) and with
    round_robin, least_load, prefix_hash and manual, all with --dp-aware, started together."""
    log_dir = tmp_path_factory.mktemp("smg")
    model_path = httpx.get(servers["decode"].url + "/server_info", timeout=10).json()["model_path"]
    assert os.path.isabs(model_path) and os.path.exists(os.path.join(model_path, "tokenizer.json")), model_path
    configs = {
        "cache_aware": ["--policy", "cache_aware", "--model-path", model_path],
        "round_robin": ["--policy", "round_robin"],
        "least_load": ["--policy", "least_load"],
        "prefix_hash": ["--policy", "prefix_hash"],
        "manual": ["--policy", "manual"],
    }
    started: dict[str, Gateway] = {}
    try:
        for name, args in configs.items():
            started[name] = Gateway(name, servers, args, log_dir)
        for gateway in started.values():
            gateway.wait_ready()
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


def body_for(path: str, text: str, stream: bool) -> dict:
    """A greedy TOKENS-token request for ``path``."""
    if path == "/generate":
        return {"text": text, "sampling_params": {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS,
                                                  "temperature": 0}, "stream": stream}
    body = {"model": MODEL, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0, "stream": stream}
    if path == "/v1/completions":
        return {**body, "prompt": text}
    return {**body, "messages": [{"role": "user", "content": text}]}


def answer(path: str, resp: httpx.Response, stream: bool) -> tuple[str | list[int], dict]:
    """What a response generated (output ids for /generate, else the text) and its served-by meta_info
    (the last chunk's when streamed)."""
    assert resp.status_code == 200, resp.text[:500]
    if not stream:
        data = resp.json()
        if path == "/generate":
            return data["output_ids"], data["meta_info"]
        choice = data["choices"][0]
        return (choice["text"] if path == "/v1/completions" else choice["message"]["content"]), choice["meta_info"]
    lines = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", resp.text[-500:]
    events = [json.loads(line) for line in lines[:-1]]
    assert not any("error" in e for e in events), resp.text[-500:]
    if path == "/generate":
        return events[-1]["output_ids"], events[-1]["meta_info"]
    choices = [e["choices"][0] for e in events if e.get("choices")]
    key = "text" if path == "/v1/completions" else "delta"
    text = "".join((c[key] if path == "/v1/completions" else c[key].get("content")) or "" for c in choices)
    metas = [c["meta_info"] for c in choices if "meta_info" in c]
    assert metas, f"no meta_info in the streamed {path} answer"
    return text, metas[-1]


def access_lines(server) -> list[tuple[str, int, int, int]]:
    """(route, room, prefill rank, decode rank) of every access-log line of a P/D server."""
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in ACCESS.finditer(server.log_path.read_text(errors="replace"))]


def used_pages(server) -> int:
    return sum(rank["num_used_pages"] for rank in httpx.get(server.url + "/get_load", timeout=10).json())


def assert_pages_freed(servers) -> None:
    for name in ("prefill", "decode"):
        assert wait_until(lambda n=name: used_pages(servers[n]) == 0, 10), f"{name} still holds KV pages"


CASES = [(path, stream) for path in ("/generate", "/v1/completions", "/v1/chat/completions") for stream in (False, True)]


def check_served(gateway: Gateway, servers: dict, request_id: str, path: str, meta: dict) -> tuple[int, int]:
    """The answer was served by P/D with SMG's own rank choice: KV bytes moved, meta_info and the decode
    server's access log name that room and both chosen ranks. Returns the ranks."""
    prefill_rank, decode_rank = gateway.choice(request_id)
    served = (meta["prefill_dp_rank"], meta["decode_dp_rank"])
    assert served == (prefill_rank, decode_rank), f"{request_id}: smg chose {(prefill_rank, decode_rank)}, served {served}"
    assert meta["kv_transfer_bytes"] > 0 and meta["bootstrap_room"] is not None, meta
    assert "local_prefill" not in meta, meta
    room = meta["bootstrap_room"]
    line = (path, room, prefill_rank, decode_rank)
    assert wait_until(lambda: line in access_lines(servers["decode"]), 5), f"decode access log lacks {line}"
    return prefill_rank, decode_rank


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_every_route_streamed_and_not_matches_mixed_with_smgs_ranks(servers, gateways, pool, policy):
    """/generate, completions and chat, streamed and not, through SMG: each answer equals the mixed server's,
    the KV moved, and the ranks SMG chose are the ranks that served."""
    gateway = gateways[policy]
    texts = {case: f"SMG {policy} says hello over {case[0]} (stream {case[1]})" for case in CASES}
    refs = {case: pool.submit(httpx.post, servers["mixed"].url + case[0], json=body_for(case[0], texts[case], False),
                              timeout=60) for case in CASES}
    sent = {case: pool.submit(httpx.post, gateway.url + case[0], json=body_for(case[0], texts[case], case[1]),
                              headers={"X-Request-Id": f"{policy}-{case[0]}-{case[1]}"}, timeout=60) for case in CASES}
    for case in CASES:
        path, stream = case
        want, _ = answer(path, refs[case].result(), False)
        got, meta = answer(path, sent[case].result(), stream)
        assert got == want, (policy, case)
        check_served(gateway, servers, f"{policy}-{path}-{stream}", path, meta)
    assert_pages_freed(servers)


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "prefix_hash", "manual"])
def test_dp_aware_ranks_are_smgs_and_round_robin_covers_every_rank(servers, gateways, policy):
    """With --dp-aware every request's ranks are SMG's choice; round robin over SMG's url@rank workers
    reaches both prefill ranks and all three decode ranks."""
    gateway = gateways[policy]
    seen_prefill, seen_decode = set(), set()
    for i in range(6):
        request_id = f"{policy}-cover-{i}"
        text = f"Rank coverage {i} through {policy}"
        resp = httpx.post(gateway.url + "/v1/completions", json=body_for("/v1/completions", text, False),
                          headers={"X-Request-Id": request_id}, timeout=60)
        _, meta = answer("/v1/completions", resp, False)
        p, d = check_served(gateway, servers, request_id, "/v1/completions", meta)
        seen_prefill.add(p)
        seen_decode.add(d)
    if policy == "round_robin":
        assert (seen_prefill, seen_decode) == ({0, 1}, {0, 1, 2})
    assert_pages_freed(servers)


def test_cache_aware_sends_a_repeated_prefix_to_the_ranks_that_hold_it(servers, gateways):
    """cache_aware (SMG's tokenizer from the servers' model_path): a prompt sent again goes to the same ranks,
    and prefill reuses its cached prefix there."""
    gateway = gateways["cache_aware"]
    text = "A long shared system prompt that the cache aware policy should keep on one rank " * 3
    first = httpx.post(gateway.url + "/generate", json=body_for("/generate", text, False),
                       headers={"X-Request-Id": "cache-first"}, timeout=60)
    _, meta1 = answer("/generate", first, False)
    ranks1 = check_served(gateway, servers, "cache-first", "/generate", meta1)
    again = httpx.post(gateway.url + "/generate", json=body_for("/generate", text + " and more", False),
                       headers={"X-Request-Id": "cache-again"}, timeout=60)
    _, meta2 = answer("/generate", again, False)
    ranks2 = check_served(gateway, servers, "cache-again", "/generate", meta2)
    assert ranks2 == ranks1
    assert meta2["cached_tokens"] > 0, meta2
    assert_pages_freed(servers)


def test_smg_classifies_pdserve_as_sglang(gateways):
    """Every DP worker SMG registered is an SGLang backend (so it injects rooms and sends both legs at once)."""
    workers = gateways["round_robin"].workers()
    assert {w.get("runtime_type") for w in workers} == {"sglang"}, workers
    urls = {w["url"] for w in workers}
    assert len(urls) == 5 and all("@" in url for url in urls), urls


def test_vllm_fields_smg_forwards_are_honoured(servers, gateways):
    """Fields vLLM-minded clients send, forwarded by SMG to both legs: vLLM's min_tokens, ignore_eos,
    skip_special_tokens, include_reasoning, stream_options.continuous_usage_stats, max_completion_tokens,
    truncate_prompt_tokens and content as text parts give the answer a mixed server gives the same request."""
    gateway = gateways["round_robin"]
    chat = {"model": MODEL, "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                         {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                      {"type": "text", "text": " there"}]}],
            "max_completion_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": True, "include_reasoning": True, "truncate_prompt_tokens": 12}
    completion = {"model": MODEL, "prompt": "Hello there, how are you today", "max_tokens": TOKENS,
                  "min_tokens": TOKENS, "temperature": 0, "include_reasoning": False, "truncate_prompt_tokens": 4}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        want, _ = answer(path, httpx.post(servers["mixed"].url + path, json=body, timeout=60), False)
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        for n, sent in enumerate((body, streamed)):
            request_id = f"fields-{path}-{n}"
            resp = httpx.post(gateway.url + path, json=sent, headers={"X-Request-Id": request_id}, timeout=60)
            got, meta = answer(path, resp, bool(n))
            assert got == want, (path, n)
            check_served(gateway, servers, request_id, path, meta)
            if n:  # continuous usage: every chunk carries the usage so far
                events = [json.loads(line[6:]) for line in resp.text.splitlines()
                          if line.startswith("data: {")]
                assert all("usage" in e for e in events), events[:2]
    assert_pages_freed(servers)


def test_decode_alone_refuses_what_smg_sends_a_vllm_backend(servers):
    """What SMG sends a backend it takes for vLLM (no room) is refused by the decode server with 400 naming
    the missing KV source, instead of silently computing the prompt there."""
    body = body_for("/v1/chat/completions", "no KV source here", False)
    started = time.monotonic()
    resp = httpx.post(servers["decode"].url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "bootstrap_room" and "names no KV source" in error["message"], error
    assert time.monotonic() - started < 5


def test_truncate_prompt_tokens_is_vllms(servers):
    """vLLM's truncate_prompt_tokens: the last k prompt tokens (truncation_side "right": the first k), -1 as
    many as fit with the output budget; 0, a k over the budget or an unknown side is a 400 naming the field."""
    mixed = servers["mixed"].url
    ids = list(range(100, 130))

    def complete(prompt: list[int], **extra) -> httpx.Response:
        return httpx.post(mixed + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": TOKENS,
                                                           "min_tokens": TOKENS, "temperature": 0, **extra}, timeout=60)

    def text_and_prompt_tokens(resp: httpx.Response) -> tuple[str, int]:
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"], resp.json()["usage"]["prompt_tokens"]

    assert text_and_prompt_tokens(complete(ids, truncate_prompt_tokens=5)) == text_and_prompt_tokens(complete(ids[-5:]))
    assert text_and_prompt_tokens(complete(ids, truncate_prompt_tokens=5, truncation_side="right")) == (
        text_and_prompt_tokens(complete(ids[:5])))
    assert text_and_prompt_tokens(complete(ids, truncate_prompt_tokens=-1)) == text_and_prompt_tokens(complete(ids))
    assert text_and_prompt_tokens(complete(ids, truncate_prompt_tokens=50)) == text_and_prompt_tokens(complete(ids))
    for extra in ({"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": -2}, {"truncate_prompt_tokens": 2**64},
                  {"truncate_prompt_tokens": 4096}, {"truncate_prompt_tokens": 5, "truncation_side": "middle"}):
        resp = complete(ids, **extra)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] in extra, resp.text
