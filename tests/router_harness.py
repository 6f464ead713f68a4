"""Run a router in-process (uvicorn on a free loopback port) for the router's unit tests.

Also a minimal aiohttp upstream used only to test the router's proxy mechanics (pairing fields,
streaming relay, aborts, retries, health). It is not a model server and stands in for none in
the end-to-end tests, which run real ``pdserve serve`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from pdserve.http_common import HttpLimits, uvicorn_server
from pdserve.router.app import RouterState, create_app
from pdserve.router.config import RouterConfig, WorkerSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_config(workers: list[WorkerSpec], **overrides: Any) -> RouterConfig:
    """A config with short health/retry timings, for tests."""
    values: dict[str, Any] = dict(
        port=free_port(), workers=workers, pd_disaggregation=any(w.role != "mixed" for w in workers),
        health_check_interval_secs=0.2, worker_startup_check_interval=0.2, health_failure_threshold=2,
        health_success_threshold=2, health_check_timeout_secs=1.0, load_poll_interval_secs=0.2,
        retry_initial_backoff_ms=10.0, connect_timeout_secs=1.0, request_timeout_secs=30.0,
    )
    values.update(overrides)
    return RouterConfig(**values)


@asynccontextmanager
async def running_router(config: RouterConfig, ready: bool = True) -> AsyncIterator[tuple[str, RouterState]]:
    """The router's base URL and state while it serves; with ``ready``, once its workers are admitted."""
    app = create_app(config)
    server = uvicorn_server(app, HttpLimits(), host="127.0.0.1", port=config.port, log_level="warning")
    task = asyncio.create_task(server.serve())
    state: RouterState = app.state.router
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        assert server.started, "router did not start"
        if ready:
            for _ in range(500):
                if state.fleet.ready() is None:
                    break
                await asyncio.sleep(0.01)
            assert state.fleet.ready() is None, state.fleet.describe()
        yield f"http://127.0.0.1:{config.port}", state
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def router_client(specs: list[WorkerSpec], ready: bool = True,
                        **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, RouterState]]:
    """A client bound to a running router over ``specs``, and the router's state."""
    async with running_router(fast_config(specs, **overrides), ready) as (url, state), httpx.AsyncClient(
            base_url=url, timeout=30.0) as client:
        yield client, state


async def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


@dataclass
class EchoUpstream:
    """A scriptable HTTP upstream: records what it receives and answers as told."""

    mode: str = "null"
    dp_size: int = 1
    bootstrap_port: int | None = 8998
    healthy: bool = True
    fail_status: int | None = None  # answer every generation call with this status
    delay_s: float = 0.0  # wait before answering a generation call
    chunks: int = 3  # streamed chunks
    chunk_delay_s: float = 0.0
    input_logprobs: list | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    active: int = 0
    cancelled: int = 0
    chunk_sent_at: list[float] = field(default_factory=list)  # perf_counter() of each streamed chunk's write
    port: int = 0
    runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> EchoUpstream:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/server_info", self._server_info)
        app.router.add_get("/get_load", self._get_load)
        app.router.add_post("/abort_request", self._abort)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        self.port = port or self.port
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "dp_size": self.dp_size, "disaggregation_mode": self.mode, "served_model_name": "echo",
            "disaggregation_bootstrap_port": self.bootstrap_port,
        })

    async def _get_load(self, request: web.Request) -> web.Response:
        return web.json_response([{"dp_rank": r, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
                                  for r in range(self.dp_size)])

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborted.append((await request.json())["rid"])
        return web.json_response({"aborted": 1})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.active += 1
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_status is not None:
                return web.json_response({"error": {"message": f"scripted {self.fail_status}"}},
                                         status=self.fail_status)
            meta: dict[str, Any] = {"id": body.get("rid"), "dp_rank": body.get("data_parallel_rank")}
            if self.input_logprobs is not None and body.get("return_logprob"):
                meta["input_token_logprobs"] = self.input_logprobs
            if not body.get("stream"):
                return web.json_response({"text": f"from {self.port}", "meta_info": meta})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.chunks):
                if i:
                    await asyncio.sleep(self.chunk_delay_s)
                self.chunk_sent_at.append(time.perf_counter())
                await resp.write(f"data: {json.dumps({'text': str(i), 'meta_info': meta})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


@asynccontextmanager
async def upstreams(*servers: EchoUpstream) -> AsyncIterator[tuple[EchoUpstream, ...]]:
    try:
        for s in servers:
            await s.start()
        yield servers
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                await s.stop()
