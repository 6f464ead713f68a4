"""The request fields each route accepts: one allow-list, so nothing is silently ignored.

Every top-level key of a ``/generate``, ``/v1/completions`` or ``/v1/chat/completions`` body is
either *honoured* (``HONOURED`` in ``pdserve/request_bodies.py``), or *accepted when off*
(``OFF_VALUES``): a feature pdserve does not implement, whose value means "off" (the defaults
sglang-router 0.3.2, the ``openai`` SDK and the vLLM/SGLang benchmark clients send). Anything else, and any other value of an off-only field, is
answered with HTTP 400 ``unsupported field: <name>``. The README's API table lists these sets.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.request_bodies import HONOURED, OFF_VALUES
from pdserve.server.errors import bad_request

_Top = dict[str, msgspec.Raw]


def check_fields(route: str, body: bytes) -> None:
    """400 ``unsupported field: NAME`` for any key of ``body`` that ``route`` neither honours nor
    accepts at its "off" value. ``body`` is the raw JSON object (values are decoded only for
    off-only fields)."""
    try:
        top = msgspec.json.decode(body, type=_Top)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # the typed decode that follows reports the malformed body
    honoured = HONOURED[route]
    off = OFF_VALUES[route]
    for key, raw in top.items():
        if key in honoured and key != "stream_options":
            continue
        if key == "stream_options":
            _check_stream_options(route, raw, off)
            continue
        allowed = off.get(key)
        if allowed is None or _decode(raw) not in allowed:
            what = "is not supported" if allowed is None else f"is only accepted with a value in {list(allowed)}"
            raise bad_request(f"unsupported field: {key} ({key} {what} on this route)", key)


def _check_stream_options(route: str, raw: msgspec.Raw, off: dict[str, tuple[Any, ...]]) -> None:
    if "stream_options" in off:  # /generate: only null
        if _decode(raw) is not None:
            raise bad_request("unsupported field: stream_options (not supported on /generate)", "stream_options")
        return
    value = _decode(raw)
    if not isinstance(value, dict):
        return  # the typed decode reports the wrong type
    for key, item in value.items():
        name = f"stream_options.{key}"
        if key == "include_usage":
            continue
        allowed = off.get(name)
        if allowed is None or item not in allowed:
            raise bad_request(f"unsupported field: {name}", name)


def _decode(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return msgspec.UNSET
