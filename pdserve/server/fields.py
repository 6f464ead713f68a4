"""The request fields each route accepts: one allow-list, so nothing is silently ignored.

Every top-level key of a ``/generate``, ``/v1/completions`` or ``/v1/chat/completions`` body is
either *honoured* (``HONOURED`` in ``pdserve/request_bodies.py``), or *accepted when off*
(``OFF_VALUES``): a field of SGLang's or vLLM's request surface that pdserve does not implement,
sent at a value that means "off" (its default, null: what routers, the ``openai`` SDK and the
benchmark clients send when they do not use it). Anything else, and any other value of an off-only
field, is answered with HTTP 400 ``unsupported field: <name>``: an "on" value is never a silent no-op.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.request_bodies import HONOURED, OFF_VALUES, is_off
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
        if allowed is None or not is_off(_decode(raw), allowed):
            what = "is not supported" if allowed is None else f"is only accepted with a value in {list(allowed)}"
            raise bad_request(f"unsupported field: {key} ({key} {what} on this route)", key)


def _check_stream_options(route: str, raw: msgspec.Raw, off: dict[str, tuple[Any, ...]]) -> None:
    honoured = HONOURED[route]
    if "stream_options" in off:  # /generate: only null
        if _decode(raw) is not None:
            raise bad_request("unsupported field: stream_options (not supported on /generate)", "stream_options")
        return
    value = _decode(raw)
    if not isinstance(value, dict):
        return  # the typed decode reports the wrong type
    for key, item in value.items():
        name = f"stream_options.{key}"
        if name in honoured:
            continue
        allowed = off.get(name)
        if allowed is None or not is_off(item, allowed):
            raise bad_request(f"unsupported field: {name}", name)


def _decode(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return msgspec.UNSET
