"""HTTP plumbing shared by the native and OpenAI routes.

Reading a size-limited JSON body into a typed msgspec Struct (so type errors name the field),
DP-rank and bootstrap parsing, SSE framing with guaranteed cleanup, and cancelling a
non-streaming request when its client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.disagg.vllm_ids import transfer_room
from pdserve.http_common import read_body
from pdserve.server.errors import ServerError, bad_request

T = TypeVar("T")

DISCONNECT_POLL_S = 0.5
RANK_HEADER = "x-data-parallel-rank"
_PATH_RE = re.compile(r"`\$\.?([^`]*)`")


async def read_json(request: Request, schema: type[T], max_bytes: int) -> T:
    """The body decoded into ``schema``; 413 beyond ``max_bytes``, 400 naming the field otherwise."""
    body = await read_body(request, max_bytes, lambda message: ServerError(413, message))
    request.state.json_body = body  # for the error handler (a P/D prefill refusal names the room)
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        decoded = msgspec.json.decode(body, type=schema)
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply") from None
    except msgspec.ValidationError as e:
        text = str(e)
        found = _PATH_RE.search(text)
        param = found.group(1) if found else None
        raise bad_request(f"invalid request: {text}", param or None) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"malformed JSON body: {e}") from None
    check_integers(decoded)
    return decoded


INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack carries to the workers (int64 / uint64)
MAX_DEPTH = 64


def check_integers(value: Any, path: str = "", depth: int = 0) -> None:
    """400 naming the field for any integer outside int64/uint64 or nesting deeper than :data:`MAX_DEPTH`
    (such values would otherwise fail later, as a 500, when the request is sent to a worker)."""
    if depth > MAX_DEPTH:
        raise bad_request(f"{path or 'the body'} is nested more than {MAX_DEPTH} levels deep", path.split(".")[0] or None)
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            name = path or "body"
            raise bad_request(f"{name} must fit in 64 bits, got an integer of {len(str(abs(value)))} digits",
                              name.split("[")[0].split(".")[0])
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            check_integers(getattr(value, field), f"{path}.{field}" if path else field, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_integers(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        if value and all(type(item) is int for item in value):  # token ids: checked in bulk
            if not (min(value) >= INT_MIN and max(value) <= INT_MAX):
                check_integers(next(v for v in value if not INT_MIN <= v <= INT_MAX), f"{path}[]", depth)
            return
        for i, item in enumerate(value):
            check_integers(item, f"{path}[{i}]", depth + 1)


def parse_rank(value: Any, name: str, dp_size: int) -> int | None:
    """A DP rank from the body or a header: None when absent, 400 naming ``name`` when invalid."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 20:
            raise bad_request(f"{name} must be an integer in [0, {dp_size - 1}], got {len(text)} characters", name)
        if text.lstrip("-").isdigit():
            value = int(text)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < dp_size:
        raise bad_request(
            f"{name} must be an integer in [0, {dp_size - 1}] (dp_size={dp_size}), got {value!r}", name
        )
    return value


def pinned_rank(request: Request, body: Any, dp_size: int) -> int | None:
    """``data_parallel_rank`` (or its newer name ``routed_dp_rank``) in the body, else the header."""
    for name in ("data_parallel_rank", "routed_dp_rank"):
        rank = parse_rank(getattr(body, name, None), name, dp_size)
        if rank is not None:
            return rank
    header = request.headers.get(RANK_HEADER)
    if header is not None:
        return parse_rank(header, "X-Data-Parallel-Rank header", dp_size)
    return None


def per_item(value: Any, count: int, name: str, batch: bool) -> list[Any]:
    """A request field for each of ``count`` items: a list (batch, one per item) or one shared value."""
    if batch and isinstance(value, list):
        if len(value) != count:
            raise bad_request(f"{name} has {len(value)} entries for a batch of {count}", name)
        return list(value)
    if isinstance(value, list) and name in ("bootstrap_host", "bootstrap_port", "bootstrap_room", "rid"):
        if len(value) != 1:
            raise bad_request(f"{name} must be a single value for a single prompt", name)
        return list(value)
    return [value] * count


def check_room(room: Any) -> int | None:
    if room is None:
        return None
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 1 << 64:
        raise bad_request(f"bootstrap_room must be an integer in [0, 2^64), got {room!r}"[:300], "bootstrap_room")
    return room


class _RoomFields(msgspec.Struct):
    """The fields of any request body that say which P/D room and DP rank it is for."""

    bootstrap_room: Any = None
    data_parallel_rank: Any = None
    routed_dp_rank: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    kv_transfer_params: Any = None  # vLLM's P/D protocol: a Mooncake-style transfer_id names the room


def _transfer_room(params: Any) -> int | None:
    """The room a prefill half's Mooncake-style ``kv_transfer_params.transfer_id`` names (server/kv_transfer.py)."""
    if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
        return None
    transfer_id = params.get("transfer_id")
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 256:
        return None
    return transfer_room(transfer_id)


def request_peers(request: Request, default_port: int) -> list[tuple[str, int, int]]:
    """P/D decode: ``(bootstrap_host, bootstrap_port, room)`` of each room a request's body named,
    where those fields are valid (to tell the prefill server that decode refused its half)."""
    raw = getattr(request.state, "json_body", None)
    if not raw:
        return []
    try:
        fields = msgspec.json.decode(raw, type=_RoomFields)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # deep nesting: no readable room
        return []
    rooms = fields.bootstrap_room if isinstance(fields.bootstrap_room, list) else [fields.bootstrap_room]
    peers = []
    for i, value in enumerate(rooms):
        host = fields.bootstrap_host[i] if isinstance(fields.bootstrap_host, list) and i < len(
            fields.bootstrap_host) else fields.bootstrap_host
        port = fields.bootstrap_port[i] if isinstance(fields.bootstrap_port, list) and i < len(
            fields.bootstrap_port) else fields.bootstrap_port
        port = default_port if port is None else port
        try:
            room = check_room(value)
        except ServerError:
            continue
        if room is not None and isinstance(host, str) and host and type(port) is int and 0 < port < 65536:
            peers.append((host, port, room))
    return peers


def request_rooms(request: Request, dp_size: int) -> tuple[list[int], int | None]:
    """The bootstrap rooms a request's JSON body named, if readable, and the DP rank it pinned:
    None when it pinned none, -1 when the pin was invalid."""
    raw = getattr(request.state, "json_body", None)
    if not raw:
        return [], None
    try:
        fields = msgspec.json.decode(raw, type=_RoomFields)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # deep nesting: no readable room
        return [], None
    values = fields.bootstrap_room if isinstance(fields.bootstrap_room, list) else [fields.bootstrap_room]
    rooms = []
    for value in values:
        try:
            room = check_room(value)
        except ServerError:
            continue
        if room is not None:
            rooms.append(room)
    transferred = _transfer_room(fields.kv_transfer_params)
    if transferred is not None:  # its decode half may be waiting already: it learns of the refusal at once
        rooms.append(transferred)
    try:
        rank = pinned_rank(request, fields, dp_size)
    except ServerError:
        rank = -1
    return rooms, rank


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response whose ``on_close`` runs however the response ends.

    Starlette may never start the body iterator (client gone before headers) or cancel it mid-way
    (disconnect); either way ``on_close`` aborts the requests that are still running.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (the caller's ``finally`` then aborts) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ServerError(499, "client disconnected")
    finally:
        task.cancel()
