"""The router's HTTP/1.1 client towards its upstreams: one keep-alive connection pool, httptools.

The router's hot path sends two requests per P/D request; aiohttp's client spent about a third of
the router's CPU there (request object, payload writer, header multidict, timer context per call).
This client does what the hot path needs and no more: one ``asyncio.Protocol`` per connection
with an httptools (llhttp, C) response parser, connections kept alive and reused per
``(host, port)`` (newest first, dropped after ``keepalive_s`` idle, before the servers' own 5 s
keep-alive could close one under a request), ``TCP_NODELAY`` on every connection, one timer per
request for its deadline, a body read whole or chunk by chunk (with back-pressure). Cancelling a
call closes its connection, which the server takes as a disconnect. No TLS, no redirects, no
cookies, no DNS per request: the router's upstreams are ``http://`` servers it was given.
Torch-free.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass

import httptools

from pdserve.ports import no_delay

READ_HIGH_WATER = 1 << 20  # buffered, unread body bytes beyond which the socket stops being read
MAX_ANSWER_BYTES = 256 << 20  # a whole answer read at once (streams are relayed chunk by chunk instead)


class UpstreamError(Exception):
    """No (complete) answer: ``reason`` is ``connect``, ``timeout``, ``disconnected`` or ``oversized``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """Where a request goes, split once per URL."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        rest = url.removeprefix("http://")
        if rest == url:
            raise ValueError(f"only http:// upstream URLs are supported, got {url!r}")
        hostport, slash, path = rest.partition("/")
        host, colon, port = hostport.rpartition(":")
        if not colon or not port.isdigit():
            host, port = hostport, "80"
        return cls(host.strip("[]"), int(port), slash + path or "/")


class Connection(asyncio.Protocol):
    """One upstream connection; carries one request at a time."""

    def __init__(self, pool: ClientPool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._head: asyncio.Future | None = None
        self._data: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False

    # -------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                no_delay(sock)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError("disconnected", f"invalid HTTP response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamError("disconnected", f"the server closed the connection"
                                     f"{': ' + str(exc) if exc else ''}"))

    # -------------------------------------------------------------- parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # read now: llhttp resets it once the message ends
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()

    # -------------------------------------------------------------- request side
    def _wake(self) -> None:
        if self._data is not None and not self._data.done():
            self._data.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        for waiter in (self._head, self._data):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved here: nobody may be waiting on it any more

    def _expire(self, seconds: float) -> None:
        self._timer = None
        if not self.complete:
            self._fail(UpstreamError("timeout", f"no complete answer within {seconds:g} s"))
            self.close()

    def send(self, data: bytes, timeout: float) -> None:
        self._reset()
        loop = self.pool.loop
        self._head = loop.create_future()
        self._timer = loop.call_later(timeout, self._expire, timeout)
        assert self.transport is not None
        self.transport.write(data)

    async def head(self) -> None:
        """Wait for the status line and headers."""
        assert self._head is not None
        if not self._head.done():
            await self._head
        elif self.error is not None:
            raise self.error

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._data = self.pool.loop.create_future()
            await self._data
            self._data = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self._paused and self.buffered <= READ_HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def read_all(self, limit: int = MAX_ANSWER_BYTES) -> bytes:
        """The whole body; UpstreamError ``oversized`` (connection closed) beyond ``limit`` bytes, so
        an upstream that lies about its answer cannot fill the router's memory."""
        parts, size = [], 0
        while True:
            chunk = await self.next_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamError("oversized", f"the answer exceeds {limit} bytes")
            parts.append(chunk)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def done(self) -> None:
        """The caller is finished with this request: back to the pool when reusable, else closed."""
        if self.complete and self.keep_alive and not self.closed and self.error is None:
            self.pool.release(self)
        else:
            self.close()
            self.pool.forget(self)


class ClientPool:
    """Kept-alive connections per ``(host, port)`` for the loop that creates it."""

    def __init__(self, keepalive_s: float = 4.0, connect_timeout_s: float = 10.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.idle: dict[tuple[str, int], list[Connection]] = {}
        self.busy: set[Connection] = set()

    async def acquire(self, host: str, port: int) -> Connection:
        key = (host, port)
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                self.busy.add(conn)
                return conn
            conn.close()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self, key), host, port), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamError("connect", f"cannot connect to {host}:{port} within "
                                           f"{self.connect_timeout_s:g} s") from None
        except OSError as e:
            raise UpstreamError("connect", f"cannot connect to {host}:{port}: {e}") from None
        self.busy.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        self.busy.discard(conn)
        conn.idle_since = time.monotonic()
        self.idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: Connection) -> None:
        self.busy.discard(conn)

    async def request(self, target: Target, body: bytes, headers: dict[str, str], timeout: float,
                      method: str = "POST") -> Connection:
        """Send one request and wait for its head; the connection then yields the body
        (``read_all``/``next_chunk``) and must be handed back with ``done()`` (or ``close()``)."""
        conn = await self.acquire(target.host, target.port)
        lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                 f"Content-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        try:
            conn.send("".join(lines).encode("latin-1") + body, timeout)
            await conn.head()
        except BaseException:
            conn.close()
            self.forget(conn)
            raise
        return conn

    async def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
        for conn in list(self.busy):
            conn.close()
        self.busy.clear()
