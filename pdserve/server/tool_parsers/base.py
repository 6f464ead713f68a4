"""The interface of a tool-call parser, and the JSON-in-tags format most share."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    """One parsed call: the function name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def call_from_json(text: str, arguments_key: str = "arguments") -> ToolCall | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}``; None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(arguments_key, value.get("parameters", value.get("arguments", {})))
    return ToolCall(value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Splits model output into plain content and tool calls.

    ``start``/``end`` are the tags around each call's JSON. Streaming: :meth:`feed` takes the text
    released so far and returns (content delta, calls completed since the last feed); content
    that could be the start of a tag is held back until it is known not to be.
    """

    start = ""
    end = ""
    arguments_key = "arguments"

    def __init__(self) -> None:
        self._content_sent = 0
        self._calls_sent = 0

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content outside the calls, the calls) of a complete output."""
        content: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while True:
            begin = text.find(self.start, pos)
            if begin < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:begin])
            stop = text.find(self.end, begin + len(self.start))
            body = text[begin + len(self.start): stop if stop >= 0 else len(text)]
            call = call_from_json(body.strip(), self.arguments_key)
            if call is None:  # not a call after all: keep it as text
                content.append(text[begin: stop + len(self.end) if stop >= 0 else len(text)])
            else:
                calls.append(call)
            if stop < 0:
                break
            pos = stop + len(self.end)
        return "".join(content).strip() if calls else "".join(content), calls

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """Streaming: the content delta and the newly completed calls, given all text so far."""
        first_tag = text.find(self.start)
        if first_tag < 0:
            hold = 0 if finished else _tag_prefix_len(text, self.start)
            safe = len(text) - hold
        else:
            safe = first_tag
        delta = text[self._content_sent: safe] if safe > self._content_sent else ""
        self._content_sent = max(self._content_sent, safe)
        if first_tag < 0:
            return delta, []
        complete = text if finished else text[: text.rfind(self.end) + len(self.end)] if self.end in text else ""
        _, calls = self.parse(complete[first_tag:]) if complete else ("", [])
        new = calls[self._calls_sent:]
        self._calls_sent = len(calls)
        return delta, new


def _tag_prefix_len(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
