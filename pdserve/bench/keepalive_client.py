"""A lean closed-loop HTTP/1.1 load client on raw asyncio streams, kept-alive by default.

Real clients (the ``openai`` SDK, SGLang's and vLLM's benchmark clients, routers towards their
upstreams) keep connections alive, so that is what latency must be measured on. aiohttp's client
saturates a core long before a fast router does; this client does the minimum per request (one
prebuilt request, a header scan, a ``Content-Length`` read) so the system under test, not the
client, is the bottleneck. ``fresh=True`` opens a new connection per request instead, for the
kept-alive/fresh comparison. Torch-free.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

HEADER_END = b"\r\n\r\n"


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    """One ``POST path`` with a JSON ``body``, ready to write."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, marks: list[float] | None = None) -> tuple[int, bytes]:
    """(status, body) of one response with a ``Content-Length`` or chunked body; with ``marks``,
    the ``perf_counter`` time of the first body chunk is appended to it (TTFT of a stream)."""
    head = await reader.readuntil(HEADER_END)
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        return status, await reader.readexactly(int(lower[at + 17 : end]))
    if b"transfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if marks is not None and not parts:
                marks.append(time.perf_counter())
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    return status, await reader.read()


@dataclass
class Endpoint:
    """A server URL split once."""

    url: str
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80


class Connection:
    """One kept-alive connection (reopened when the server closed it), or a fresh one per call."""

    def __init__(self, endpoint: Endpoint, fresh: bool) -> None:
        self.endpoint = endpoint
        self.fresh = fresh
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, data: bytes, marks: list[float] | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
            assert self.reader is not None
            try:
                self.writer.write(data)
                result = await read_response(self.reader, marks)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt or self.fresh:
                    raise
                continue  # the server closed an idle kept-alive connection: once more on a new one
            if self.fresh:
                self.close()
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# one request: given a worker's connections, returns whether it succeeded
Sender = Callable[[list[Connection]], "asyncio.Future[bool]"]


def router_sender(endpoint: Endpoint, path: str, body: dict) -> tuple[list[Endpoint], Callable]:
    """Send ``body`` to ``path`` of one server (a router or a mixed server)."""
    data = request_bytes(endpoint.host, endpoint.port, path, msgspec.json.encode(body))

    async def send(conns: list[Connection]) -> bool:
        status, _ = await conns[0].post(data)
        return status == 200

    return [endpoint], send


def ttft_sender(endpoint: Endpoint, path: str, body: dict, ttfts: list[float]) -> tuple[list[Endpoint], Callable]:
    """Stream ``body`` from one server; each request's time to its first chunk goes to ``ttfts``."""
    data = request_bytes(endpoint.host, endpoint.port, path, msgspec.json.encode({**body, "stream": True}))

    async def send(conns: list[Connection]) -> bool:
        marks: list[float] = []
        start = time.perf_counter()
        status, _ = await conns[0].post(data, marks)
        if marks:
            ttfts.append(marks[0] - start)
        return status == 200

    return [endpoint], send


def direct_pd_sender(prefill: Endpoint, decode: Endpoint, bootstrap_port: int, path: str,
                     body: dict, ttfts: list[float] | None = None) -> tuple[list[Endpoint], Callable]:
    """Do a P/D router's job: both halves at once with a fresh bootstrap room. With ``ttfts``,
    decode's half streams and its time to the first chunk is recorded (prefill's never streams)."""
    encode = msgspec.json.encode

    async def send(conns: list[Connection]) -> bool:
        room = dict(body, bootstrap_host=prefill.host, bootstrap_port=bootstrap_port,
                    bootstrap_room=random.getrandbits(63))
        p_data = encode(room)
        d_data = p_data if ttfts is None else encode({**room, "stream": True})
        marks: list[float] | None = None if ttfts is None else []
        start = time.perf_counter()
        (sp, _), (sd, _) = await asyncio.gather(
            conns[0].post(request_bytes(prefill.host, prefill.port, path, p_data)),
            conns[1].post(request_bytes(decode.host, decode.port, path, d_data), marks))
        if marks:
            ttfts.append(marks[0] - start)
        return sp == 200 and sd == 200

    return [prefill, decode], send


async def closed_loop(endpoints: list[Endpoint], send: Callable, concurrency: int, total: int,
                      warmup: int = 20, fresh: bool = False) -> dict:
    """``total`` requests from ``concurrency`` workers, each on its own connection(s):
    requests/s, latency percentiles (ms) and failures."""
    workers = [[Connection(e, fresh) for e in endpoints] for _ in range(concurrency)]
    for i in range(warmup):
        await send(workers[i % concurrency])
    latencies: list[float] = []
    failures = 0
    issued = 0

    async def run(conns: list[Connection]) -> None:
        nonlocal issued, failures
        while issued < total:
            issued += 1
            t = time.perf_counter()
            try:
                ok = await send(conns)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
                for c in conns:
                    c.close()
            latencies.append(time.perf_counter() - t)
            failures += not ok

    start = time.perf_counter()
    await asyncio.gather(*(run(w) for w in workers))
    elapsed = time.perf_counter() - start
    for w in workers:
        for c in w:
            c.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"concurrency": concurrency, "requests": len(latencies), "failures": failures,
            "req_per_s": len(latencies) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": sum(latencies) / len(latencies) * 1000, "keep_alive": not fresh}


def run_closed_loop(endpoints: list[Endpoint], send: Callable, concurrency: int, total: int,
                    warmup: int = 20, fresh: bool = False) -> dict:
    """:func:`closed_loop` on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    return runner(closed_loop(endpoints, send, concurrency, total, warmup, fresh))
