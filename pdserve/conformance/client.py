"""The suite's HTTP client: one request through the router, the answer as the client saw it, and
the P/D fields (ranks, room, KV bytes) the answer carries."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "tiny-llama-v1"
P_D_FIELDS = ("prefill_dp_rank", "decode_dp_rank", "bootstrap_room", "kv_transfer_bytes", "prompt_tokens",
              "completion_tokens")


@dataclass
class Answer:
    route: str
    stream: bool
    rid: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    text: str = ""
    events: list[Any] = field(default_factory=list)
    done: bool = False  # a streamed answer ended with ``data: [DONE]``
    elapsed: float = 0.0
    error: str | None = None  # a transport error instead of an answer

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def summary(self) -> str:
        if self.error:
            return f"no answer ({self.error}) after {self.elapsed:.2f} s"
        return f"HTTP {self.status} after {self.elapsed:.2f} s{'' if self.ok else ': ' + self.text[:200]}"

    def meta(self) -> dict[str, Any]:
        """The P/D fields of the answer: ``/generate``'s ``meta_info``, OpenAI's top-level fields and
        choice ``meta_info``, streamed or not (later chunks win), then the rank headers."""
        out: dict[str, Any] = {}
        for item in [self.body, *self.events]:
            if not isinstance(item, dict):
                continue
            for part in (item, item.get("meta_info"), item.get("usage"),
                         *(c.get("meta_info") for c in item.get("choices") or [] if isinstance(c, dict))):
                if isinstance(part, dict):
                    out.update({k: part[k] for k in P_D_FIELDS if part.get(k) is not None})
        for key, header in (("prefill_dp_rank", "x-prefill-dp-rank"), ("decode_dp_rank", "x-decode-dp-rank")):
            if key not in out and self.headers.get(header, "").isdigit():
                out[key] = int(self.headers[header])
        return out


def payload(route: str, prompt: str | list[int], rid: str, max_new_tokens: int = 8, stream: bool = False,
            **extra: Any) -> dict[str, Any]:
    """A greedy request of ``max_new_tokens`` tokens (EOS ignored) for ``route``."""
    if route == "/generate":
        body: dict[str, Any] = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                    "ignore_eos": True}}
        body["input_ids" if isinstance(prompt, list) else "text"] = prompt
    else:
        body = {"model": MODEL, "max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
        if route == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
    body.update(rid=rid, stream=stream, **extra)
    return body


def new_client() -> httpx.Client:
    """One client for a whole suite (shared by its threads): building one per request costs more
    CPU than the request on a loaded machine."""
    return httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))


def send(client: httpx.Client, base_url: str, route: str, body: dict[str, Any],
         headers: dict[str, str] | None = None, timeout: float = 60.0) -> Answer:
    """POST ``body`` to ``route``; a streamed answer is read to its end."""
    stream = bool(body.get("stream"))
    answer = Answer(route, stream, str(body.get("rid")))
    start = time.monotonic()
    try:
        with client.stream("POST", base_url + route, json=body, headers=headers or {},
                           timeout=timeout) as resp:
            answer.status = resp.status_code
            answer.headers = {k.lower(): v for k, v in resp.headers.items()}
            is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            if is_sse and answer.ok:
                lines = []
                for line in resp.iter_lines():
                    lines.append(line)
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        answer.done = True
                        continue
                    try:
                        answer.events.append(json.loads(data))
                    except ValueError:
                        answer.events.append(data)
                answer.text = "\n".join(lines)
            else:
                answer.text = resp.read().decode(errors="replace")
                try:
                    answer.body = json.loads(answer.text)
                except ValueError:
                    answer.body = None
    except httpx.HTTPError as e:
        answer.error = f"{type(e).__name__}: {e}"[:300]
    answer.elapsed = time.monotonic() - start
    return answer
