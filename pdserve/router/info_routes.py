"""The router's informational routes: what a server answers, answered for the one model it fronts.

Benchmark clients ask the endpoint they measure: SGLang's bench_serving reads ``/model_info`` for
its tokenizer, vLLM's bench ``/v1/models`` (``root``) and ``/tokenize``, guidellm ``/v1/models``.
``/model_info`` comes from a healthy worker and is cached until that worker is re-admitted;
``/server_info`` and ``/v1/models`` are built from the ``/server_info`` the fleet read at admission;
``/tokenize`` and ``/detokenize`` are forwarded to a healthy worker (decode or mixed first).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdserve import __version__
from pdserve.http_common import read_body
from pdserve.router.errors import RouterError
from pdserve.router.worker import Worker

if TYPE_CHECKING:
    from pdserve.router.app import RouterState

ROLE_ORDER = {"decode": 0, "mixed": 0, "prefill": 1}  # a decode server answers as the fronted model
FORWARDED_POSTS = ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize")
SERVER_ONLY_KEYS = ("host", "port")  # a worker's own address, not the router's


def info_routes(state: RouterState) -> list[Route]:
    """The routes, bound to ``state`` (its session and fleet are read per request)."""
    config = state.config
    model_info_cache: dict[str, tuple[dict[str, Any], Any]] = {}  # url -> (the worker.info it was read under, body)

    def serving_workers() -> list[Worker]:
        healthy = [w for w in state.fleet.workers.values() if w.healthy and w.info]
        return sorted(healthy, key=lambda w: ROLE_ORDER.get(w.role, 2))

    async def get_json(worker: Worker, path: str) -> Any:
        assert state.session is not None
        timeout = aiohttp.ClientTimeout(total=config.health_check_timeout_secs)
        async with state.session.get(worker.url + path, headers=state.worker_headers, timeout=timeout) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def model_info(request: Request) -> Response:
        errors = []
        for worker in serving_workers():
            cached = model_info_cache.get(worker.url)
            if cached is not None and cached[0] is worker.info:
                return JSONResponse(cached[1])
            try:
                body = await get_json(worker, "/model_info")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                errors.append(f"{worker.url}: {e!r}")
                continue
            model_info_cache[worker.url] = (worker.info, body)
            return JSONResponse(body)
        raise RouterError(503, "no healthy worker answered /model_info" + (f" ({'; '.join(errors)})" if errors else ""))

    async def server_info(request: Request) -> Response:
        workers = serving_workers()
        info: dict[str, Any] = {}
        if workers:
            info = {k: v for k, v in workers[0].info.items() if k not in SERVER_ONLY_KEYS}
        info.update({"router": "pdserve", "version": __version__, "workers": state.fleet.describe()})
        if config.pd_disaggregation:  # sglang-router's shape in P/D mode: each side's servers
            for role in ("prefill", "decode"):
                info[role] = [w.info for w in workers if w.role == role]
        return JSONResponse(info)

    async def models(request: Request) -> Response:
        data: dict[str, dict[str, Any]] = {}
        for w in serving_workers():
            name = w.info.get("served_model_name")
            if isinstance(name, str) and name not in data:
                data[name] = {"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
                              "root": w.info.get("model_path"), "max_model_len": w.info.get("context_length")}
        return JSONResponse({"object": "list", "data": list(data.values())})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def forwarded(request: Request) -> Response:
        raw = await read_body(request, config.max_payload_size, lambda message: RouterError(413, message))
        assert state.session is not None
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_secs, connect=config.connect_timeout_secs)
        headers = {"Content-Type": request.headers.get("content-type", "application/json"), **state.worker_headers}
        workers = serving_workers()
        if not workers:
            raise RouterError(503, "no healthy worker")
        for candidate in workers:
            try:
                async with state.session.post(candidate.url + request.url.path, data=raw, headers=headers,
                                              timeout=timeout) as resp:
                    body = await resp.read()
                    return Response(body, status_code=resp.status,
                                    media_type=resp.headers.get("Content-Type", "application/json"))
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                continue  # the next healthy worker tokenizes the same way
        raise RouterError(502, f"no healthy worker answered {request.url.path}")

    return [
        Route("/model_info", model_info, methods=["GET"]),
        Route("/get_model_info", model_info, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        *(Route(path, forwarded, methods=["POST"]) for path in FORWARDED_POSTS),
    ]
