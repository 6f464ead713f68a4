"""HTTP calls to the servers over one pooled aiohttp session.

A call never raises for an upstream failure: it answers a :class:`Reply` whose ``status`` is 0
when no response came (``reason`` says why), so the caller decides between retry and relay.
Cancelling a call closes its connection, which the server takes as a disconnect and aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp
import msgspec

from pdserve.http_common import RANK_HEADERS

JSON = {"Content-Type": "application/json"}
RETRY_STATUSES = frozenset({408, 429})
RETRYABLE_HEADER = "X-Pdserve-Retryable"  # a pdserve server's own verdict on an error answer
ABORT_TIMEOUT_S = 5.0


@dataclass
class Reply:
    """A whole upstream answer, or (``status`` 0) the failure to get one."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    reason: str = ""  # failures: "connect", "timeout", "disconnected", "status", "empty_stream"
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

    resp: aiohttp.ClientResponse
    first: bytes

    def close(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        if self.resp.content.at_eof():
            self.resp.release()
        else:
            self.resp.close()


def _verdict(resp: aiohttp.ClientResponse) -> bool | None:
    value = resp.headers.get(RETRYABLE_HEADER, "").strip().lower()
    return {"true": True, "false": False}.get(value)


def rank_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The rank headers (``RANK_HEADERS``) a server's answer carries."""
    return {name: resp.headers[name] for name in RANK_HEADERS if name in resp.headers}


def _failure(e: BaseException) -> Reply:
    if isinstance(e, aiohttp.ClientConnectorError):
        reason = "connect"
    elif isinstance(e, asyncio.TimeoutError):
        reason = "timeout"
    else:
        reason = "disconnected"
    return Reply(0, f"{type(e).__name__}: {e}".encode(), "text/plain", reason)


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, request_timeout_s: float, connect_timeout_s: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST and read the whole answer."""
        try:
            async with self.session.post(url, data=body, headers=headers, timeout=self.timeout) as resp:
                data = await resp.read()
                return Reply(resp.status, data, resp.headers.get("Content-Type", "application/json"),
                             "" if 200 <= resp.status < 300 else "status", _verdict(resp), rank_headers(resp))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _failure(e)

    async def open_stream(self, url: str, body: bytes, headers: dict[str, str]) -> Stream | Reply:
        """POST and wait for a 2xx status and the first chunk; a Reply when that fails."""
        resp = None
        try:
            resp = await self.session.post(url, data=body, headers=headers, timeout=self.timeout)
            if not 200 <= resp.status < 300:
                data = await resp.read()
                resp.release()
                return Reply(resp.status, data, resp.headers.get("Content-Type", "application/json"), "status",
                             _verdict(resp))
            first = await resp.content.readany()
            if not first:
                resp.close()
                return Reply(502, b'{"error": {"message": "upstream closed the stream before any data", '
                                  b'"code": 502}}', reason="empty_stream")
            return Stream(resp, first)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if resp is not None:
                resp.close()
            return _failure(e)
        except BaseException:
            if resp is not None:
                resp.close()
            raise

    async def abort(self, base_url: str, rid: str, headers: dict[str, str]) -> None:
        """Best effort ``POST /abort_request {"rid": rid}``."""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self.session.post(
                base_url + "/abort_request", data=msgspec.json.encode({"rid": rid}), headers=headers,
                timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S),
            ) as resp:
                await resp.read()
