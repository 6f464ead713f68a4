"""``pdserve bench serving``: metric math, arrivals, datasets, CLI wiring, and end to end on a real server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import cli as bench_cli
from pdserve.bench.arrivals import arrival_offsets, poisson_intervals
from pdserve.bench.backends import ENDPOINTS, build_payload, send_request
from pdserve.bench.datasets import (
    BenchRequest,
    DatasetError,
    length_range,
    load_sharegpt,
    sample_random,
)
from pdserve.bench.metrics import (
    RequestRecord,
    compute_metrics,
    max_concurrency,
    meets_slo,
    parse_slo,
    summarize_ms,
    tpot,
)
from pdserve.bench.report import format_table
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer
from tests.server_harness import launch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_model_path())


def rec(i: int, ttft: float, latency: float, output_len: int, itl: list[float] | None = None,
        success: bool = True, start: float = 0.0, prompt_len: int = 10) -> RequestRecord:
    return RequestRecord(index=i, prompt_len=prompt_len, expected_output_len=output_len, success=success,
                         error="" if success else "boom", output_len=output_len, ttft=ttft,
                         itl=list(itl or []), latency=latency, start=start)


# ---------------------------------------------------------------------- metric math


def test_tpot_definition():
    assert tpot(rec(0, ttft=0.1, latency=1.1, output_len=11)) == pytest.approx(0.1)
    assert tpot(rec(0, ttft=0.1, latency=0.1, output_len=1)) is None
    assert tpot(rec(0, ttft=0.1, latency=0.1, output_len=0)) is None


def test_summarize_ms_matches_numpy_percentiles():
    values = [0.001 * k for k in range(1, 101)]  # 1..100 ms
    s = summarize_ms(values)
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(np.percentile(np.arange(1, 101), 90))
    assert s["p99"] == pytest.approx(99.01)
    assert summarize_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}
    assert summarize_ms([0.25])["p99"] == pytest.approx(250.0)


def test_compute_metrics_on_hand_made_records():
    records = [
        rec(0, ttft=0.10, latency=0.50, output_len=5, itl=[0.1] * 4, start=0.0, prompt_len=10),
        rec(1, ttft=0.20, latency=1.00, output_len=9, itl=[0.1] * 8, start=0.2, prompt_len=20),
        rec(2, ttft=0.30, latency=0.30, output_len=1, start=0.4, prompt_len=30),
        rec(3, ttft=0.0, latency=0.05, output_len=0, success=False, start=2.0, prompt_len=40),
    ]
    m = compute_metrics(records, duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["total_input_tokens"] == 60  # failed requests are not counted
    assert m["total_output_tokens"] == 15
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["input_throughput"] == pytest.approx(30.0)
    assert m["output_throughput"] == pytest.approx(7.5)
    assert m["total_token_throughput"] == pytest.approx(37.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT: (0.5-0.1)/4 = 0.1 and (1.0-0.2)/8 = 0.1; the 1-token request has none
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(600.0)
    assert m["max_concurrency_seen"] == 3  # 0-0.5, 0.2-1.2, 0.4-0.7 overlap; 2.0-2.05 alone
    assert m["slo"] is None and m["slo_attainment"] is None and m["request_goodput"] is None
    json.dumps(m, allow_nan=False)


def test_slo_attainment_and_goodput():
    records = [
        rec(0, ttft=0.10, latency=0.50, output_len=5),  # tpot 100 ms
        rec(1, ttft=0.40, latency=0.80, output_len=5),  # ttft too high
        rec(2, ttft=0.10, latency=1.30, output_len=5),  # tpot 300 ms
        rec(3, ttft=0.05, latency=0.05, output_len=1),  # one token: tpot counts as 0
        rec(4, ttft=0.01, latency=0.02, output_len=5, success=False),  # failed: never good
    ]
    slo = parse_slo(["ttft:200", "tpot:150"])
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    m = compute_metrics(records, duration_s=4.0, slo=slo)
    assert m["good_requests"] == 2
    assert m["slo_attainment"] == pytest.approx(2 / 5)
    assert m["request_goodput"] == pytest.approx(0.5)
    with_e2e = compute_metrics(records, 4.0, parse_slo(["ttft:200", "tpot:150", "e2el:100"]))
    assert with_e2e["good_requests"] == 1
    assert meets_slo(rec(0, ttft=0.2, latency=0.6, output_len=5), parse_slo(["ttft:200", "tpot:100"]))


@pytest.mark.parametrize("bad", [["ttft"], ["foo:10"], ["ttft:x"], ["ttft:0"], ["ttft:-5"], ["ttft:1", "ttft:2"]])
def test_parse_slo_rejects_bad_limits(bad):
    with pytest.raises(ValueError):
        parse_slo(bad)


def test_max_concurrency():
    assert max_concurrency([]) == 0
    assert max_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # touching intervals do not overlap
    assert max_concurrency([(0, 10), (1, 2), (1.5, 3), (2.5, 4)]) == 3


def test_table_prints_every_section():
    records = [rec(0, ttft=0.1, latency=0.5, output_len=5, itl=[0.1] * 4)]
    m = compute_metrics(records, 1.0, parse_slo(["ttft:200"]))
    table = format_table(m, max_concurrency=4, request_rate=math.inf)
    for label in ("Successful requests:", "Median TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):",
                  "P90 E2EL (ms):", "SLO attainment (%):", "Request goodput (req/s):", "Max concurrency seen:"):
        assert label in table
    assert "n/a" in format_table(compute_metrics([], 1.0))


# ---------------------------------------------------------------------- arrivals


def test_poisson_reproducible_with_right_mean():
    a = poisson_intervals(20000, rate=4.0, seed=7)
    assert a == poisson_intervals(20000, rate=4.0, seed=7)
    assert a != poisson_intervals(20000, rate=4.0, seed=8)
    assert np.mean(a) == pytest.approx(0.25, rel=0.03)
    assert np.std(a) == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    assert min(a) >= 0.0


def test_arrival_offsets():
    assert poisson_intervals(5, math.inf, 0) == [0.0] * 5
    offsets = arrival_offsets(5, 2.0, seed=1)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and len(offsets) == 5
    assert np.diff(offsets).tolist() == pytest.approx(poisson_intervals(4, 2.0, seed=1))
    assert arrival_offsets(0, 1.0, 0) == []
    with pytest.raises(ValueError):
        poisson_intervals(3, 0.0, 0)


# ---------------------------------------------------------------------- datasets


def test_random_lengths_within_range_and_text_round_trips(tokenizer):
    reqs = sample_random(tokenizer, 64, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    assert len(reqs) == 64
    assert all(20 <= r.prompt_len <= 60 for r in reqs)
    assert all(5 <= r.output_len <= 15 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 5  # sampled per request
    for r in reqs:
        assert tokenizer.encode(r.prompt, add_special_tokens=False) == r.prompt_ids
        assert not set(r.prompt_ids) & set(tokenizer.all_special_ids)
    again = sample_random(tokenizer, 64, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]
    fixed = sample_random(tokenizer, 8, input_len=16, output_len=4, range_ratio=0.0, seed=0)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(16, 4)}


def test_length_range_bounds():
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(3, 1.0) == (1, 6)
    with pytest.raises(DatasetError):
        length_range(10, 1.5)


def _write_sharegpt(path: Path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "Tell me about the quick brown fox and the lazy dog."},
                           {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog every day."}]},
        {"conversations": [{"from": "system", "value": "be brief"},
                           {"from": "human", "value": "What is the capital of France, please?"},
                           {"from": "gpt", "value": "The capital of France is Paris, on the Seine."},
                           {"from": "human", "value": "ignored later turn"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, friend!"}]},
        {"conversations": [{"from": "human", "value": "Write a long story. " * 300},
                           {"from": "gpt", "value": "Once upon a time."}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "no conversations"},
    ]
    path.write_text(json.dumps(data))


def test_sharegpt_loader(tmp_path, tokenizer):
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path)
    reqs = load_sharegpt(path, tokenizer, num_prompts=2, seed=0)
    prompts = {r.prompt for r in reqs}
    assert prompts == {"Tell me about the quick brown fox and the lazy dog.",
                       "What is the capital of France, please?"}  # "Hi" too short, the story too long
    for r in reqs:
        assert r.prompt_ids == tokenizer.encode(r.prompt, add_special_tokens=False)
        assert r.output_len >= 2
    fox = next(r for r in reqs if "fox" in r.prompt)
    assert fox.output_len == len(tokenizer.encode("The quick brown fox jumps over the lazy dog every day.",
                                                  add_special_tokens=False))
    fixed = load_sharegpt(path, tokenizer, num_prompts=2, seed=0, output_len=7)
    assert {r.output_len for r in fixed} == {7}
    with pytest.raises(DatasetError, match="only 2 usable"):
        load_sharegpt(path, tokenizer, num_prompts=3, seed=0)


def test_sharegpt_missing_or_bad_file(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="not found.*nothing is downloaded"):
        load_sharegpt(tmp_path / "absent.json", tokenizer, 1, 0)
    with pytest.raises(DatasetError, match="--dataset-path"):
        load_sharegpt(None, tokenizer, 1, 0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_sharegpt(bad, tokenizer, 1, 0)


# ---------------------------------------------------------------------- payloads and CLI wiring


def test_payloads():
    req = BenchRequest(prompt=" hello world", prompt_ids=[5, 6], output_len=3)
    native = build_payload("pdserve", req, None, {"sampling_params": {"top_k": 1}, "rid": "x"})
    assert native == {"input_ids": [5, 6], "stream": True, "rid": "x",
                      "sampling_params": {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0.0, "top_k": 1}}
    comp = build_payload("openai-completions", req, "m", None)
    assert comp["prompt"] == " hello world" and comp["max_tokens"] == 3 and comp["model"] == "m"
    assert comp["stream_options"] == {"include_usage": True} and comp["ignore_eos"] is True
    chat = build_payload("openai-chat", req, "m", None)
    assert chat["messages"] == [{"role": "user", "content": " hello world"}] and "prompt" not in chat


async def _fake_stream(chunks: list[tuple[float, str]], backend: str) -> RequestRecord:
    """``send_request`` against an in-process SSE server that sends ``(delay_s, line)`` chunks."""
    import aiohttp
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delay, line in chunks:
            await asyncio.sleep(delay)
            await response.write(line.encode())
        return response

    app = web.Application()
    app.router.add_post(ENDPOINTS[backend], handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            record = RequestRecord(index=0, prompt_len=2, expected_output_len=4)
            return await send_request(session, f"http://127.0.0.1:{port}", backend, {}, record,
                                      lambda text: len(text.split()))
    finally:
        await runner.cleanup()


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def test_native_stream_timing_splits_multi_token_chunks():
    chunks = [(0.05, _sse({"text": "a", "meta_info": {"completion_tokens": 1}})),
              (0.10, _sse({"text": "a b c", "meta_info": {"completion_tokens": 3}})),
              (0.05, _sse({"text": "a b c d", "meta_info": {"completion_tokens": 4}})),
              (0.0, "data: [DONE]\n\n")]
    r = asyncio.run(_fake_stream(chunks, "pdserve"))
    assert r.success, r.error
    assert (r.output_len, r.output_len_source) == (4, "server")
    assert len(r.itl) == 3 and r.itl[0] == r.itl[1]  # the 2-token chunk's gap split in two
    assert r.itl[0] == pytest.approx(0.05, abs=0.03)
    assert r.ttft >= 0.04 and r.latency >= r.ttft + sum(r.itl) - 1e-6


def test_openai_stream_counts_with_tokenizer_without_usage():
    piece = {"choices": [{"index": 0, "text": " word"}]}
    last = {"choices": [{"text": "", "finish_reason": "length"}]}
    chunks = [(0.01, _sse(piece)), (0.01, _sse(piece)), (0.01, _sse(last)), (0.0, "data: [DONE]\n\n")]
    r = asyncio.run(_fake_stream(chunks, "openai-completions"))
    assert r.success and (r.output_len, r.output_len_source) == (2, "tokenizer") and len(r.itl) == 1
    usage = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}
    r = asyncio.run(_fake_stream([(0.0, _sse({"choices": [{"delta": {"content": "hi there"}}]})),
                                  (0.0, _sse(usage)), (0.0, "data: [DONE]\n\n")], "openai-chat"))
    assert r.success and (r.output_len, r.output_len_source) == (2, "server")


@pytest.mark.parametrize(("chunks", "error"), [
    ([(0.0, _sse({"text": "a", "meta_info": {"completion_tokens": 1}}))], "without data: [DONE]"),
    ([(0.0, _sse({"error": {"message": "engine died"}})), (0.0, "data: [DONE]\n\n")], "engine died"),
    ([(0.0, "data: [DONE]\n\n")], "no output token"),
    ([(0.0, "data: {broken\n\n")], "JSONDecodeError"),
])
def test_stream_failures_are_recorded(chunks, error):
    r = asyncio.run(_fake_stream(chunks, "pdserve"))
    assert not r.success and error in r.error


def _pdserve(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CI="true")
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=timeout)


def test_cli_transfer_hook_and_errors(monkeypatch):
    assert set(bench_cli.BENCHMARKS) >= {"serving", "transfer"}
    monkeypatch.setitem(bench_cli.BENCHMARKS, "transfer", ("pdserve.bench.no_such_module", "x"))
    assert bench_cli._load("transfer") is None
    out = _pdserve("bench", "serving", "--base-url", "http://127.0.0.1:9", "--goodput", "ttft")
    assert out.returncode == 2 and "--goodput" in out.stderr
    out = _pdserve("bench", "serving", "--base-url", "http://127.0.0.1:9", "--dataset", "sharegpt",
                   "--dataset-path", "/nonexistent/sharegpt.json", "--tokenizer-path", default_model_path())
    assert out.returncode == 2 and "not found" in out.stderr, out.stderr


# ---------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch(["--max-total-tokens", "4096", "--page-size", "16", "--log-level", "warning"],
                         tmp_path_factory.mktemp("bench-server"))
    try:
        srv.wait_healthy(timeout=60.0)
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("backend", ["pdserve", "openai-completions", "openai-chat"])
def test_bench_serving_end_to_end(server, backend, tmp_path):
    out_file = tmp_path / f"{backend}.json"
    out = _pdserve("bench", "serving", "--base-url", server.url, "--backend", backend, "--num-prompts", "8",
                   "--random-input-len", "24", "--random-output-len", "8", "--random-range-ratio", "0.25",
                   "--request-rate", "50", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:60000",
                   "--seed", "1", "--output-file", str(out_file), "--disable-tqdm", timeout=50.0)
    assert out.returncode == 0, out.stdout + out.stderr + server.log()
    assert "Serving Benchmark Result" in out.stdout and "Mean TTFT (ms):" in out.stdout
    result = json.loads(out_file.read_text())
    m = result["metrics"]
    assert (m["completed"], m["failed"]) == (8, 0), [r["error"] for r in result["requests"]]
    assert m["duration_s"] > 0 and m["request_throughput"] > 0 and m["output_throughput"] > 0
    for key in ("mean", "median", "p90", "p99"):
        assert m[f"{key}_ttft_ms"] > 0 and m[f"{key}_e2el_ms"] > 0
        assert m[f"{key}_tpot_ms"] > 0 and m[f"{key}_itl_ms"] > 0
    assert m["mean_e2el_ms"] > m["mean_ttft_ms"]
    assert 1 <= m["max_concurrency_seen"] <= 4
    assert m["slo_attainment"] == 1.0 and m["request_goodput"] == pytest.approx(8 / m["duration_s"])
    assert result["args"]["backend"] == backend and result["args"]["num_prompts"] == 8
    assert len(result["requests"]) == 8
    for r in result["requests"]:
        assert r["success"] and r["error"] == ""
        assert 18 <= r["prompt_len"] <= 30
        assert r["output_len"] == r["expected_output_len"]  # ignore_eos honoured
        assert r["output_len_source"] == "server"
        assert 0 < r["ttft"] <= r["latency"]
        assert len(r["itl"]) >= 1
    assert m["total_output_tokens"] == sum(r["expected_output_len"] for r in result["requests"])
