"""A loopback TCP relay in front of one server that can delay, fail or drop the router's requests.

The conformance suite hands the router the relays' URLs instead of the servers' own, so it can make
one leg of a P/D request arrive late (both arrival orders), answer a leg itself with a 4xx or 5xx,
or close the port, whatever router is under test. Bytes pass through unchanged; only a chunk from
the router that starts a ``POST`` to a generation route is looked at (its room and its arrival time
are recorded). Either side closing its connection closes the other, so a router cancelling a leg
reaches the server as a disconnect, as it would without the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
GENERATION_ROUTES = (b"POST /generate ", b"POST /v1/completions ", b"POST /v1/chat/completions ")
ROOM = re.compile(rb'"bootstrap_room"\s*:\s*(\d+)')
RID = re.compile(rb'"rid"\s*:\s*"([^"]{1,200})"')


@dataclass
class Arrival:
    """One generation request the relay saw: when, its room and rid (when the chunk had them)."""

    at: float
    proxy: str
    room: int | None
    rid: str | None


@dataclass
class FailPlan:
    """Answer the next ``count`` generation requests on any relay sharing this plan with ``status``."""

    status: int
    count: int = 1
    failed: list[Arrival] = field(default_factory=list)


class ProxyLoop:
    """The event loop (in a daemon thread) every relay of one suite runs on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="conformance-proxies", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class FaultProxy:
    """A relay from ``port`` (free, loopback) to ``upstream_port``; see the module docstring."""

    def __init__(self, name: str, upstream_port: int, loop: ProxyLoop) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.loop = loop
        self.port = 0
        self.delay_s = 0.0
        self.fail: FailPlan | None = None
        self.arrivals: list[Arrival] = []
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.open()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def open(self) -> None:
        """Listen (again, on the same port once it had one)."""
        self.loop.call(self._listen())

    def close_port(self) -> None:
        """Stop listening and drop every open connection: the server's port looks closed."""
        self.loop.call(self._close())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        tasks = [asyncio.ensure_future(self._to_server(reader, up_writer, writer)),
                 asyncio.ensure_future(self._pipe(up_reader, writer))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _to_server(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter,
                         client: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if data.startswith(GENERATION_ROUTES):
                arrival = self._note(data)
                plan = self.fail
                if plan is not None and plan.count > 0:
                    plan.count -= 1
                    plan.failed.append(arrival)
                    client.write(_answer(plan.status, f"conformance relay {self.name}: injected HTTP {plan.status}"))
                    await client.drain()
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                    arrival.at = time.monotonic()  # when the server gets it
            up.write(data)
            await up.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    def _note(self, data: bytes) -> Arrival:
        room, rid = ROOM.search(data), RID.search(data)
        arrival = Arrival(time.monotonic(), self.name, int(room.group(1)) if room else None,
                          rid.group(1).decode(errors="replace") if rid else None)
        self.arrivals.append(arrival)
        return arrival

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.close_port()


def _answer(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    reason = {400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body
