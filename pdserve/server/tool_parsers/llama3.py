"""Llama 3.1+ JSON format: ``<|python_tag|>{"name": ..., "parameters": {...}}`` or the bare JSON
object as the whole reply; several calls separated by ``;``."""

from __future__ import annotations

from pdserve.server.tool_parsers.base import ToolCall, ToolParser, call_from_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    start = PYTHON_TAG
    end = "<|eom_id|>"
    arguments_key = "parameters"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.split(PYTHON_TAG, 1)[1] if PYTHON_TAG in text else text
        body = body.replace(self.end, "").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in _split_objects(body):
            call = call_from_json(part, self.arguments_key)
            if call is None:
                return text, []
            calls.append(call)
        content = text.split(PYTHON_TAG, 1)[0].strip() if PYTHON_TAG in text else ""
        return content, calls

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """A reply that may be a bare JSON call is held back until it is complete."""
        if text.lstrip().startswith("{") or PYTHON_TAG in text:
            if not finished:
                return "", []
            content, calls = self.parse(text)
            return (content if not calls else ""), calls
        return super().feed(text, finished)


def _split_objects(body: str) -> list[str]:
    """Top-level JSON objects separated by ';' (braces inside strings respected)."""
    parts, depth, start, in_str, escape = [], 0, 0, False, False
    for i, ch in enumerate(body):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                parts.append(body[start: i + 1].strip().lstrip(";").strip())
                start = i + 1
    rest = body[start:].strip().lstrip(";").strip()
    if rest:
        parts.append(rest)
    return parts
