"""HTTP calls to the servers over the router's keep-alive pool (:mod:`pdserve.router.http_client`).

A call never raises for an upstream failure: it answers a :class:`Reply` whose ``status`` is 0
when no response came (``reason`` says why), so the caller decides between retry and relay.
Cancelling a call closes its connection, which the server takes as a disconnect and aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from pdserve.http_common import RANK_HEADERS
from pdserve.router.http_client import ClientPool, Connection, Target, UpstreamError

RETRY_STATUSES = frozenset({408, 429})
RETRYABLE_HEADER = "X-Pdserve-Retryable"  # a pdserve server's own verdict on an error answer
ABORT_TIMEOUT_S = 5.0
_RANK_KEYS = tuple((name, name.lower()) for name in RANK_HEADERS)


@dataclass
class Reply:
    """A whole upstream answer, or (``status`` 0) the failure to get one."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    reason: str = ""  # failures: "connect", "timeout", "disconnected", "oversized", "status", "empty_stream"
    verdict: bool | None = None  # the server's RETRYABLE_HEADER, when it sent one
    ranks: dict[str, str] = field(default_factory=dict)  # the server's rank headers (RANK_HEADERS)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """Worth another pair: no answer, 408/429 or 5xx, unless the server said the request caused it."""
        if self.ok:
            return False
        if self.verdict is not None:
            return self.verdict
        return self.status == 0 or self.status >= 500 or self.status in RETRY_STATUSES


@dataclass
class Stream:
    """An upstream streaming answer whose status was 2xx and whose first chunk has arrived."""

    conn: Connection
    first: bytes

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers, names in lower case."""
        return self.conn.headers

    async def rest(self) -> AsyncIterator[bytes]:
        """The chunks after :attr:`first`, as they arrive (UpstreamError when the stream breaks)."""
        while True:
            chunk = await self.conn.next_chunk()
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        self.conn.done()


def _verdict(headers: dict[str, str]) -> bool | None:
    return {"true": True, "false": False}.get(headers.get(RETRYABLE_HEADER.lower(), "").strip().lower())


def rank_headers(headers: dict[str, str]) -> dict[str, str]:
    """The rank headers (``RANK_HEADERS``) among an answer's (lower-cased) ``headers``."""
    return {name: headers[key] for name, key in _RANK_KEYS if key in headers}


def _failure(e: UpstreamError) -> Reply:
    # an oversized answer is that server's fault, not the request's, but another pair would answer the same
    verdict = False if e.reason == "oversized" else None
    return Reply(0, f"{type(e).__name__}: {e}".encode(), "text/plain", e.reason, verdict)


class Upstream:
    """The router's calls to its servers: whole answers, streams and aborts."""

    def __init__(self, pool: ClientPool, request_timeout_s: float) -> None:
        self.pool = pool
        self.timeout = request_timeout_s
        self._targets: dict[str, Target] = {}

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 4096:  # URLs come from the fleet, but bound the cache anyway
                self._targets.clear()
            target = self._targets[url] = Target.parse(url)
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST and read the whole answer."""
        conn = None
        try:
            conn = await self.pool.request(self._target(url), body, headers, self.timeout)
            data = await conn.read_all()
        except UpstreamError as e:
            if conn is not None:
                conn.done()
            return _failure(e)
        except BaseException:
            if conn is not None:
                conn.close()
                conn.done()
            raise
        h = conn.headers
        conn.done()
        status = conn.status
        return Reply(status, data, h.get("content-type", "application/json"),
                     "" if 200 <= status < 300 else "status", _verdict(h), rank_headers(h))

    async def open_stream(self, url: str, body: bytes, headers: dict[str, str]) -> Stream | Reply:
        """POST and wait for a 2xx status and the first chunk; a Reply when that fails."""
        conn = None
        try:
            conn = await self.pool.request(self._target(url), body, headers, self.timeout)
            h = conn.headers
            if not 200 <= conn.status < 300:
                data = await conn.read_all()
                conn.done()
                return Reply(conn.status, data, h.get("content-type", "application/json"), "status", _verdict(h))
            first = await conn.next_chunk()
            if not first:
                conn.done()
                return Reply(502, b'{"error": {"message": "upstream closed the stream before any data", '
                                  b'"code": 502}}', reason="empty_stream")
            return Stream(conn, first)
        except UpstreamError as e:
            if conn is not None:
                conn.done()
            return _failure(e)
        except BaseException:
            if conn is not None:
                conn.close()
                conn.done()
            raise

    async def abort(self, base_url: str, rid: str, headers: dict[str, str]) -> None:
        """Best effort ``POST /abort_request {"rid": rid}``."""
        with contextlib.suppress(UpstreamError, asyncio.TimeoutError):
            conn = await self.pool.request(self._target(base_url + "/abort_request"),
                                           msgspec.json.encode({"rid": rid}), headers, ABORT_TIMEOUT_S)
            try:
                await conn.read_all()
            finally:
                conn.done()
