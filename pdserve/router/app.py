"""The router's ASGI app: routes, body checks, API key, and the lifespan of its session and loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.http_common import API_KEY_MESSAGE, ApiKeyMiddleware, freeze_startup_heap
from pdserve.router.config import RouterConfig, WorkerSpec, check_url
from pdserve.router.errors import RouterError, error_response
from pdserve.router.fleet import Fleet, ModeMismatch
from pdserve.router.http_client import ClientPool
from pdserve.router.info_routes import info_routes
from pdserve.router.kv_event_watch import KVEventWatcher
from pdserve.router.metrics import RouterMetrics
from pdserve.router.openapi import openapi_document
from pdserve.router.pairing import NoWorkers, Pairing
from pdserve.router.policies import make_policy
from pdserve.router.prefix_index import CacheIndex
from pdserve.router.processes import mark_ready, sibling_count, unready_siblings
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.proxy import MIXED_SET_FIELDS, PD_SET_FIELDS, RANK_HEADER_FIELD, Proxy
from pdserve.router.request_info import RequestInfo, request_info
from pdserve.router.upstream import Upstream

logger = logging.getLogger("pdserve.router")

OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness", "/metrics"})
FORWARDED_HEADERS = ("authorization", "x-request-id")
ROLE_ALIASES = {"prefill": "prefill", "decode": "decode", "mixed": "mixed", "regular": "mixed"}
READY_POLL_S = 0.05  # how often a process among several checks whether its fleet is ready
FEED_SYNC_S = 1.0  # how often the set of followed /kv_events feeds is matched to the healthy workers


def _reject_api_key(path: str) -> ASGIApp:
    return error_response(path, 401, API_KEY_MESSAGE, "invalid_api_key")


class RouterState:
    """Everything one router app owns; the session, upstream and proxy exist while it runs."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.fleet = Fleet(config, self.metrics)
        self.cache_index = CacheIndex(config.max_tree_size, config.cache_block_chars)
        self.prefill_policy = make_policy(config.prefill_policy, config, self.cache_index)
        self.decode_policy = make_policy(config.decode_policy, config, self.cache_index)
        self.fleet.poll_load = self.prefill_policy.uses_load or self.decode_policy.uses_load
        # mixed mode uses the prefill policy only
        self.uses_cache = self.prefill_policy.uses_cache or (config.pd_disaggregation and self.decode_policy.uses_cache)
        self.prompt_tokenizer = PromptTokenizer() if self.uses_cache and config.tokenize_prompts else None
        self.kv_events: KVEventWatcher | None = None
        self._feed_task: asyncio.Task | None = None
        self._ready_task: asyncio.Task | None = None
        for policy in (self.prefill_policy, self.decode_policy):
            self.fleet.on_units_dropped.append(policy.forget)
        self.pairing = Pairing(self.fleet, self.prefill_policy, self.decode_policy, config.dp_coupled)
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self.pool: ClientPool | None = None
        self.worker_headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            # idle connections are dropped before uvicorn's 5 s keep-alive would close them under us
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.pool = ClientPool(keepalive_s=4.0, connect_timeout_s=self.config.connect_timeout_secs)
        upstream = Upstream(self.pool, self.config.request_timeout_secs)
        self.proxy = Proxy(self.config, self.fleet, self.pairing, upstream, self.metrics)
        self.fleet.start(self.session)
        if sibling_count() > 1:
            self._ready_task = asyncio.create_task(self._mark_ready(), name="router-ready-marker")
        if self.uses_cache and self.config.kv_events:
            self.kv_events = KVEventWatcher(self.cache_index, self.worker_headers,
                                            self.config.health_check_timeout_secs)
            self._feed_task = asyncio.create_task(self._follow_feeds(), name="router-kv-feeds")

    async def _mark_ready(self) -> None:
        """With sibling router processes: say so in the shared folder once this one's fleet is ready."""
        while self.fleet.ready() is not None:
            await asyncio.sleep(READY_POLL_S)
        mark_ready()

    async def _follow_feeds(self) -> None:
        assert self.kv_events is not None and self.session is not None
        while True:
            self.kv_events.sync(self.session, list(self.fleet.workers.values()))
            await asyncio.sleep(FEED_SYNC_S)

    async def with_tokens(self, route: str, body: dict[str, Any], info: RequestInfo) -> RequestInfo:
        """``info`` with the prompt's token ids, when a cache-based policy will use them."""
        if self.prompt_tokenizer is None:
            return info
        path = next((w.info["model_path"] for w in self.fleet.workers.values()
                     if w.healthy and isinstance(w.info.get("model_path"), str)), None)
        return await self.prompt_tokenizer.annotate(route, body, info, path)

    async def stop(self) -> None:
        if self._ready_task is not None:
            self._ready_task.cancel()
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        if self.kv_events is not None:
            await self.kv_events.stop()
        await self.fleet.stop()
        if self.proxy is not None:
            await self.proxy.close()
        self.metrics.close()
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.close()


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; 400 when it is not one."""
    if not raw:
        raise RouterError(400, "empty request body: send a JSON object")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise RouterError(400, f"invalid JSON body: {e}") from None
    except RecursionError:
        raise RouterError(400, "the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RouterError(400, f"the body must be a JSON object, got {type(body).__name__}")
    if body.get("stream") not in (None, True, False):
        raise RouterError(400, f"stream must be a boolean, got {body['stream']!r}")
    return body


async def read_asgi_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body from ASGI ``receive``: 413 beyond ``limit`` bytes (declared or
    streamed), ClientDisconnect when the client leaves first."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RouterError(413, f"request body of {value.decode()} bytes exceeds the limit of {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise RouterError(413, f"request body exceeds the limit of {limit} bytes")
        return body
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RouterError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(receive: Receive, work: Awaitable[ASGIApp]) -> ASGIApp:
    """``work``'s response, or a 499 after cancelling ``work`` if the client disconnects first
    (body already read). ``work`` runs in the calling task; one watcher task reads ``receive``."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if hasattr(current, "uncancel"):  # Python >= 3.11: this cancellation is handled here
            current.uncancel()
        return Response(status_code=499)
    finally:
        watcher.cancel()


def header_rank(value: bytes) -> int:
    """The decode DP rank an ``X-Data-Parallel-Rank`` header names; 400 unless a non-negative integer."""
    text = value.decode("latin-1").strip()
    if not (text.isdigit() and len(text) <= 9):
        raise RouterError(400, f"X-Data-Parallel-Rank header must be a non-negative integer, got {text[:40]!r}",
                          "invalid_rank")
    return int(text)


PROXIED_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


class RouterApp:
    """The router's ASGI app: the proxied paths on the raw handler, the rest on Starlette;
    ``state.router`` is its :class:`RouterState`."""

    def __init__(self, app: ASGIApp, state: Any, router: RouterState) -> None:
        self._app = app
        self.state = state
        self.state.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def create_app(config: RouterConfig) -> RouterApp:
    """The router's app; ``app.state.router`` holds its :class:`RouterState`."""
    state = RouterState(config)

    forwarded = {name.encode(): name for name in FORWARDED_HEADERS}

    async def proxied(scope: Scope, receive: Receive, send: Send) -> None:
        """The hot path as a raw ASGI handler: no routing table, middleware stack or Request object
        per request. Every refusal is counted and shaped as the framework's handlers shape it."""
        started = time.perf_counter()
        route = scope["path"]
        response: ASGIApp
        try:
            assert state.proxy is not None
            body = parse_body(await read_asgi_body(scope, receive, config.max_payload_size))
            info = await state.with_tokens(route, body, request_info(route, body))
            headers = {"Content-Type": "application/json", **state.worker_headers}
            for name, value in scope["headers"]:
                if name in forwarded:
                    headers[forwarded[name]] = value.decode("latin-1")
                elif name == b"x-data-parallel-rank":  # beats the body's field, as in SGLang and vLLM
                    body[RANK_HEADER_FIELD] = header_rank(value)
            state.metrics.inflight.inc()
            try:
                response = await until_disconnected(
                    receive, state.proxy.handle(route, body, info, headers, started))
            finally:
                state.metrics.inflight.dec()
        except RouterError as e:
            state.metrics.answered(route, e.status, 0.0)
            response = error_response(route, e.status, e.message, e.code)
        except NoWorkers as e:
            state.metrics.answered(route, 503, 0.0)
            response = error_response(route, 503, str(e), f"no_{e.side}_worker")
        except ClientDisconnect:
            state.metrics.answered(route, 499, 0.0)
            return  # the client left while sending its body: nobody reads an answer
        except Exception as e:
            logger.exception("unexpected error on %s", route)
            response = error_response(route, 500, f"internal router error: {type(e).__name__}: {e}")
        await response(scope, receive, send)

    async def proxied_route(request: Request) -> Response:  # only for the OpenAPI table: proxied() serves
        raise AssertionError("proxied paths are served by the raw ASGI handler")

    async def health(request: Request) -> Response:
        missing = state.fleet.ready() or unready_siblings()
        if missing is not None:
            return error_response("/health", 503, missing)
        return JSONResponse({"status": "ok"})

    async def liveness(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def get_loads(request: Request) -> Response:
        units = []
        for w in state.fleet.workers.values():
            for u in w.units:
                units.append({
                    "worker": w.url, "type": w.role, "dp_rank": u.rank, "healthy": w.healthy, "load": u.load,
                    "router_inflight_tokens": u.inflight_tokens, "router_inflight_requests": u.inflight_requests,
                    "external_tokens": u.external_tokens,
                    "cached_pages_known": state.cache_index.pages_of(u) if state.uses_cache else None,
                    "reported": u.reported,
                })
        return JSONResponse({"units": units})

    async def workers(request: Request) -> Response:
        return JSONResponse({
            "pd_disaggregation": config.pd_disaggregation,
            "prefill_policy": config.prefill_policy if config.pd_disaggregation else None,
            "decode_policy": config.decode_policy if config.pd_disaggregation else None,
            "policy": None if config.pd_disaggregation else config.prefill_policy,
            "dp_coupled": config.dp_coupled,
            "workers": state.fleet.describe(),
        })

    def single_process(path: str) -> None:
        if config.router_processes > 1:
            raise RouterError(409, f"{path} would change one of the {config.router_processes} router processes "
                                   "only (--router-processes): restart the router with the new worker list")

    async def add_worker(request: Request) -> Response:
        single_process("/add_worker")
        q = request.query_params
        url = q.get("url")
        if not url:
            raise RouterError(400, "url is required: POST /add_worker?url=http://HOST:PORT&type=prefill|decode")
        try:
            url = check_url(url)
        except ValueError as e:
            raise RouterError(400, str(e)) from None
        kind = q.get("type", q.get("worker_type"))
        if config.pd_disaggregation:
            if kind not in ("prefill", "decode"):
                raise RouterError(400, f"type must be prefill or decode in P/D mode, got {kind!r}")
        elif kind not in (None, "mixed", "regular"):
            raise RouterError(400, f"type must be regular (or absent) without --pd-disaggregation, got {kind!r}")
        role = ROLE_ALIASES[kind or "mixed"]
        port_text = q.get("bootstrap_port")
        port = None
        if port_text not in (None, "", "none"):
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise RouterError(400, f"bootstrap_port must be an integer in [1, 65535], got {port_text!r}")
            if role != "prefill":
                raise RouterError(400, "bootstrap_port applies to prefill workers only")
            port = int(port_text)
        try:
            worker = state.fleet.add(WorkerSpec(url, role, port))
        except ValueError as e:
            raise RouterError(409, str(e)) from None
        problem = await state.fleet.probe(worker)
        if problem is None:
            try:
                await state.fleet.admit(worker)
            except ModeMismatch as e:
                state.fleet.remove(url)
                raise RouterError(400, str(e)) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                worker.last_error = f"/server_info: {e!r}"
        else:
            worker.last_error = problem
        status = "admitted" if worker.healthy else "pending"
        return JSONResponse({"status": status, "worker": worker.describe()}, status_code=200 if worker.healthy else 202)

    async def remove_worker(request: Request) -> Response:
        single_process("/remove_worker")
        url = request.query_params.get("url", "").rstrip("/")
        if state.fleet.remove(url) is None:
            raise RouterError(404, f"no worker {url!r}")
        return JSONResponse({"status": "removed", "url": url})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    routes = [
        Route("/generate", proxied_route, methods=["POST"]),
        Route("/v1/completions", proxied_route, methods=["POST"]),
        Route("/v1/chat/completions", proxied_route, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/readiness", health, methods=["GET"]),
        Route("/liveness", liveness, methods=["GET"]),
        Route("/get_loads", get_loads, methods=["GET"]),
        Route("/workers", workers, methods=["GET"]),
        *info_routes(state),  # /model_info, /server_info, /v1/models, /tokenize, ...
        Route("/add_worker", add_worker, methods=["POST"]),
        Route("/remove_worker", remove_worker, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    spec = openapi_document(routes, PD_SET_FIELDS if config.pd_disaggregation else MIXED_SET_FIELDS)

    async def on_router_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        state.metrics.answered(request.url.path, exc.status, 0.0)
        return error_response(request.url.path, exc.status, exc.message, exc.code)

    async def on_no_workers(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NoWorkers)
        state.metrics.answered(request.url.path, 503, 0.0)
        return error_response(request.url.path, 503, str(exc), f"no_{exc.side}_worker")

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(request.url.path, exc.status_code, message)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        state.metrics.answered(request.url.path, 499, 0.0)
        return Response(status_code=499)  # the client left while sending its body: nobody reads this

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal router error: {type(exc).__name__}: {exc}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            await state.stop()

    framework = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RouterError: on_router_error,
            NoWorkers: on_no_workers,
            HTTPException: on_http_error,
            ClientDisconnect: on_client_gone,
            Exception: on_unexpected,
        },
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PROXIED_PATHS:
            await proxied(scope, receive, send)
        else:
            await framework(scope, receive, send)

    served: ASGIApp = app
    if config.api_key:
        served = ApiKeyMiddleware(app, api_key=config.api_key, open_paths=OPEN_PATHS, rejection=_reject_api_key)
    return RouterApp(served, framework.state, state)
