"""One streamed benchmark request per backend: build the body, send it, time the tokens.

``pdserve``/``sglang`` use SGLang's ``POST /generate`` (cumulative ``text`` and
``meta_info.completion_tokens`` per SSE chunk); ``openai-completions`` and ``openai-chat`` use the
OpenAI routes with ``stream_options.include_usage``. No retries: a failure is recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestRecord

ENDPOINTS: dict[str, str] = {
    "pdserve": "/generate",
    "sglang": "/generate",
    "openai-completions": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
}
NATIVE_BACKENDS = ("pdserve", "sglang")
MAX_ERROR_CHARS = 500


def build_payload(backend: str, req: BenchRequest, model: str | None,
                  extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body for ``req``: greedy, ``ignore_eos``, streamed; ``extra_body`` merged on top
    (its ``sampling_params`` into the native ones)."""
    extra = dict(extra_body or {})
    if backend in NATIVE_BACKENDS:
        params = {"max_new_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0}
        params.update(extra.pop("sampling_params", None) or {})
        body: dict[str, Any] = {"input_ids": req.prompt_ids, "sampling_params": params, "stream": True}
    else:
        body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        if backend == "openai-chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
    body.update(extra)
    return body


@dataclass
class _TokenClock:
    """Token arrival times of one response."""

    start: float
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    last: float = 0.0

    def tick(self, now: float, new_tokens: int) -> None:
        """``new_tokens`` arrived at ``now``; gaps after the first arrival are split evenly."""
        if new_tokens <= 0:
            return
        if self.tokens == 0:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last) / new_tokens] * new_tokens)
        self.tokens += new_tokens
        self.last = now


@dataclass
class _StreamState:
    """What the chunks said so far."""

    text: str = ""
    server_tokens: int | None = None
    error: str = ""


def _native_chunk(data: dict[str, Any], state: _StreamState) -> int:
    """Apply one ``/generate`` chunk; the number of new tokens it carries."""
    text = data.get("text") or ""
    meta = data.get("meta_info") or {}
    count = meta.get("completion_tokens")
    if isinstance(count, int):
        new = count - (state.server_tokens or 0)
        state.server_tokens = count
    else:
        new = 1 if len(text) > len(state.text) else 0
    state.text = text
    return max(new, 0)


def _openai_chunk(data: dict[str, Any], state: _StreamState, chat: bool) -> int:
    """Apply one OpenAI chunk; 1 when it carries text (one chunk per token), else 0."""
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        state.server_tokens = usage["completion_tokens"]
    choices = data.get("choices") or []
    if not choices:
        return 0
    piece = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
    if not piece:
        return 0
    state.text += piece
    return 1


def _error_text(data: dict[str, Any]) -> str:
    err = data.get("error")
    if isinstance(err, dict):
        err = err.get("message", err)
    return f"server error in stream: {err}"[:MAX_ERROR_CHARS]


async def _sse_events(response: aiohttp.ClientResponse):
    """Yield the payload of each ``data:`` line as it arrives."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.strip().startswith(b"data:"):
        yield buffer.strip()[5:].strip()


async def send_request(session: aiohttp.ClientSession, base_url: str, backend: str, payload: dict[str, Any],
                       record: RequestRecord, count_tokens: Callable[[str], int],
                       headers: dict[str, str] | None = None, bench_start: float = 0.0) -> RequestRecord:
    """Send one streamed request and fill ``record`` (times from ``time.perf_counter``)."""
    url = base_url.rstrip("/") + ENDPOINTS[backend]
    state = _StreamState()
    start = time.perf_counter()
    record.start = start - bench_start
    clock = _TokenClock(start=start)
    done = False
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                body = (await response.text())[:MAX_ERROR_CHARS]
                record.error = f"HTTP {response.status}: {body}"
            else:
                async with aclosing(_sse_events(response)) as events:
                    async for raw in events:
                        now = time.perf_counter()
                        if raw == b"[DONE]":
                            done = True
                            continue  # read the body to its end: closing early reads as a 499 upstream
                        if done:
                            continue
                        data = json.loads(raw)
                        if not isinstance(data, dict):
                            record.error = "unexpected stream chunk: not a JSON object"
                            break
                        if "error" in data:
                            record.error = _error_text(data)
                            break
                        if backend in NATIVE_BACKENDS:
                            new = _native_chunk(data, state)
                        else:
                            new = _openai_chunk(data, state, chat=backend == "openai-chat")
                        clock.tick(now, new)
    except TimeoutError:
        record.error = f"timed out after {time.perf_counter() - start:.1f} s (the per-request limit)"
    except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    record.latency = time.perf_counter() - start
    if not record.error and not done:
        record.error = "stream ended without data: [DONE]"
    if not record.error and clock.tokens == 0:
        record.error = "no output token received"
    record.ttft, record.itl = clock.ttft, clock.itl
    if state.server_tokens is not None:
        record.output_len, record.output_len_source = state.server_tokens, "server"
    else:
        record.output_len, record.output_len_source = count_tokens(state.text), "tokenizer"
    record.success = not record.error
    return record
