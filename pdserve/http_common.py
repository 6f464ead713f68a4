"""HTTP plumbing shared by the server and the router: API-key middleware, bounded body reads, and the
caps of every HTTP listener (:class:`HttpLimits`, header-read deadline)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdserve.ports import no_delay

PREFILL_RANK_HEADER = "X-Prefill-DP-Rank"  # which DP ranks served a request (servers set them, the router relays)
DECODE_RANK_HEADER = "X-Decode-DP-Rank"
RANK_HEADERS = (PREFILL_RANK_HEADER, DECODE_RANK_HEADER)
API_KEY_MESSAGE = "missing or invalid API key: send 'Authorization: Bearer <key>'"


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer KEY`` on every HTTP path but ``open_paths``; ``rejection(path)``
    builds the 401 response in the caller's error format."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: frozenset[str], rejection: Callable[[str], ASGIApp]
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths
        self.rejection = rejection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = dict(scope.get("headers") or [])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await self.rejection(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int, too_large: Callable[[str], Exception]) -> bytes:
    """The whole request body, refused with ``too_large(message)`` beyond ``limit`` bytes, whether
    the client declared its length or streams it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------- listener caps (server and router)

HTTP_REFUSALS: Counter[str] = Counter()  # reason -> connections cut by the caps below (rendered in /metrics)
REFUSAL_HOOKS: list[Callable[[str], None]] = []  # called with the reason of every refusal (router metrics)
_logged: set[str] = set()


def record_http_refusal(reason: str, detail: str) -> None:
    HTTP_REFUSALS[reason] += 1
    for hook in REFUSAL_HOOKS:
        hook(reason)
    if reason not in _logged:
        _logged.add(reason)
        logging.getLogger("pdserve.http").warning("HTTP listener refused %s: %s (logged once; counted in /metrics)",
                                                  reason, detail)


@dataclass
class HttpLimits:
    """Caps of one HTTP listener (``--http-*`` flags)."""

    header_timeout: float = 10.0  # a request's headers must arrive within this (slowloris)
    keep_alive: float = 5.0  # idle kept-alive connections close after this
    max_connections: int = 1024  # beyond: new requests get 503 (uvicorn's limit_concurrency)
    max_header_bytes: int = 64 << 10  # request line and headers (h11's max incomplete event size)
    body_idle_timeout: float = 10.0  # a request body that stops arriving for this long is cut
    http_impl: str = "httptools"  # uvicorn's HTTP parser: httptools (C, the default) or h11 (pure Python)

    def validate(self) -> None:
        if not (self.header_timeout > 0 and self.keep_alive > 0 and self.body_idle_timeout > 0):
            raise ValueError("--http-header-timeout, --http-body-idle-timeout and --http-keep-alive must be > 0 seconds")
        if self.max_connections < 1 or self.max_header_bytes < 1024:
            raise ValueError("--http-max-connections must be >= 1 and --http-max-header-bytes >= 1024")
        if self.http_impl not in HTTP_PROTOCOLS:
            raise ValueError(f"--http-impl must be one of {', '.join(HTTP_PROTOCOLS)}, got {self.http_impl!r}")

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config options: the guarded protocol with these caps, on uvloop where installed."""
        base = HTTP_PROTOCOLS[self.http_impl]
        protocol = type(base.__name__, (base,), {"header_timeout": self.header_timeout,
                                                 "body_idle_timeout": self.body_idle_timeout,
                                                 "max_header_bytes": self.max_header_bytes})
        return {
            "http": protocol,
            "loop": "auto",  # uvloop when installed (uvicorn[standard]), else asyncio
            "timeout_keep_alive": max(1, round(self.keep_alive)),
            "limit_concurrency": self.max_connections,
            "h11_max_incomplete_event_size": self.max_header_bytes,
        }


def add_http_limit_arguments(parser: argparse.ArgumentParser) -> None:
    d = HttpLimits()
    parser.add_argument("--http-header-timeout", type=float, default=d.header_timeout,
                        help="seconds a client has to send a request's headers before the connection is closed")
    parser.add_argument("--http-keep-alive", type=float, default=d.keep_alive,
                        help="seconds an idle kept-alive connection stays open")
    parser.add_argument("--http-max-connections", type=int, default=d.max_connections,
                        help="concurrent connections and requests; beyond, requests are answered 503")
    parser.add_argument("--http-max-header-bytes", type=int, default=d.max_header_bytes,
                        help="largest request line plus headers (431/400 beyond)")
    parser.add_argument("--http-body-idle-timeout", type=float, default=d.body_idle_timeout,
                        help="seconds a request body may stop arriving before the connection is closed")
    parser.add_argument("--http-impl", choices=("httptools", "h11"), default=d.http_impl,
                        help="HTTP/1.1 parser of the listener: httptools (C) or h11 (pure Python); same caps")


def http_limits_from_args(args: argparse.Namespace) -> HttpLimits:
    limits = HttpLimits(args.http_header_timeout, args.http_keep_alive, args.http_max_connections,
                        args.http_max_header_bytes, args.http_body_idle_timeout, args.http_impl)
    limits.validate()
    return limits


HEADERS_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                     b"content-length: 40\r\nconnection: close\r\n\r\nrequest line and headers are too large\r\n")


class ReadDeadlines:
    """Read deadlines and the head cap for uvicorn's HTTP protocols (uvicorn alone waits forever for
    a half-sent request): a connection whose client has not sent a complete request line and headers
    within :attr:`header_timeout` of connecting (or of the first byte of its next request) is closed,
    and so is one whose request body stops arriving for :attr:`body_idle_timeout` (while the app is
    reading it: a paused read is the server's wait, not the client's). The app then sees a
    disconnect. A request line plus headers over :attr:`max_header_bytes` is answered 431 and
    closed, however it arrives. Every accepted connection gets ``TCP_NODELAY``.

    Mixed into a uvicorn protocol class, which supplies ``transport``, ``loop``, ``flow`` and
    ``cycle``; the subclass says where the parser is (:meth:`_awaiting_headers`, :meth:`_in_body`)."""

    header_timeout = 10.0
    body_idle_timeout = 10.0
    max_header_bytes = 64 << 10

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

    def _in_body(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                no_delay(sock)
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_tail = b""
        self._arm_timers()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers() and self._head_too_large(data):
            record_http_refusal("header_bytes", f"request line and headers over {self.max_header_bytes} bytes")
            self.transport.write(HEADERS_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm_timers()

    def _head_too_large(self, data: bytes) -> bool:
        """Count ``data`` towards the current request's head (up to its blank line)."""
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
        too_large = self._head_bytes > self.max_header_bytes
        if end < 0:
            self._head_tail = seen[-3:]
        else:
            self._head_bytes, self._head_tail = 0, b""
        return too_large

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_body_timer()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_timers(self) -> None:
        if self._awaiting_headers():
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._cancel_body_timer()
        if self._in_body() and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.body_idle_timeout, self._body_deadline)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            record_http_refusal("header_timeout", f"no complete request headers within {self.header_timeout:g} s")
            self.transport.close()

    def _body_deadline(self) -> None:
        self._body_timer = None
        if not self._in_body() or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the app has not read what came: wait for it, not for the client
            self._body_timer = self.loop.call_later(self.body_idle_timeout, self._body_deadline)
            return
        record_http_refusal("body_timeout", f"request body stalled for {self.body_idle_timeout:g} s")
        self.transport.close()


class GuardedH11Protocol(ReadDeadlines, H11Protocol):
    """uvicorn's pure-Python h11 protocol with :class:`ReadDeadlines` (``--http-impl h11``)."""

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _in_body(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY


class GuardedHttpToolsProtocol(ReadDeadlines, HttpToolsProtocol):
    """uvicorn's httptools (llhttp, C) protocol with :class:`ReadDeadlines`: the default, several
    times cheaper per request than h11. The parser's position is tracked from its callbacks."""

    def connection_made(self, transport: Any) -> None:
        self._parsing = "idle"  # "head" from a request's first byte, "body" after its headers, "idle" after it
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        self._parsing = "head"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._parsing = "body"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._parsing = "idle"
        super().on_message_complete()

    def _awaiting_headers(self) -> bool:
        return self._parsing != "body" and (self.cycle is None or self.cycle.response_complete)

    def _in_body(self) -> bool:
        return self._parsing == "body"


HTTP_PROTOCOLS: dict[str, type] = {"httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}


def uvicorn_server(app: ASGIApp, limits: HttpLimits, **options: Any) -> Any:
    """The ``uvicorn.Server`` every pdserve HTTP listener runs (server fronts and the router): the
    guarded protocol of ``limits`` on uvloop; ``options`` are further ``uvicorn.Config`` fields.
    Serve it with ``server.run(sockets=[ports.listen_socket(...)])``."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, lifespan="on", **limits.uvicorn_options(), **options))


GC_GEN0_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def freeze_startup_heap() -> None:
    """Move every object alive after startup (modules, app, config) out of the garbage collector's
    view (``gc.freeze``) and collect the young generation less often. Without it, a full
    collection every few thousand requests walks the whole startup heap while requests wait:
    measured on the router at 32 kept-alive clients, p99 40-59 ms with the defaults, 16-20 ms
    frozen (p50 unchanged). Cycles made later are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
