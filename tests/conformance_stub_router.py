"""A deliberately broken P/D router for the conformance suite's tests: it ignores explicit ranks.

It drops every rank field (and the ``X-Data-Parallel-Rank`` header) the client sent and serves every
request on DP rank 0 of both sides (prefill and decode servers in turn), as a router that knows
nothing of DP ranks would. Otherwise it is a correct P/D router: both legs at once with one fresh
room, the first failing leg cancels the other, decode's answer (streamed or not) relayed.

    python tests/conformance_stub_router.py --port P --prefill URL BOOTSTRAP_PORT ... --decode URL ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

RANK_FIELDS = ("data_parallel_rank", "routed_dp_rank", "prefill_data_parallel_rank", "disagg_prefill_dp_rank")
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


def build_app(prefills: list[tuple[str, int]], decodes: list[str]) -> Starlette:
    next_prefill, next_decode = itertools.cycle(prefills), itertools.cycle(decodes)
    client = httpx.AsyncClient(timeout=120.0)

    async def relay(request: Request) -> Response:
        body = await request.json()
        for name in RANK_FIELDS:
            body.pop(name, None)
        (p_url, bootstrap), d_url = next(next_prefill), next(next_decode)
        common = {**body, "bootstrap_host": urlsplit(p_url).hostname, "bootstrap_port": bootstrap,
                  "bootstrap_room": random.getrandbits(63)}
        p_body = {**common, "data_parallel_rank": 0, "stream": False}
        d_body = {**common, "data_parallel_rank": 0, "disagg_prefill_dp_rank": 0}
        path, stream = request.url.path, bool(body.get("stream"))
        p_task = asyncio.ensure_future(client.post(p_url + path, json=p_body))
        d_task = asyncio.ensure_future(client.send(client.build_request("POST", d_url + path, json=d_body),
                                                   stream=stream))
        done, _ = await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
        if p_task in done and (p_task.exception() or p_task.result().status_code >= 300):
            d_task.cancel()
            if p_task.exception():
                return JSONResponse({"error": {"message": f"prefill failed: {p_task.exception()!r}"}}, 502)
            return Response(p_task.result().content, p_task.result().status_code, media_type="application/json")
        try:
            d = await d_task
        except httpx.HTTPError as e:
            p_task.cancel()
            return JSONResponse({"error": {"message": f"decode failed: {e!r}"}}, 502)
        if d.status_code >= 300:
            p_task.cancel()
            content = await d.aread()
            await d.aclose()
            return Response(content, d.status_code, media_type="application/json")
        if stream:
            return StreamingResponse(d.aiter_raw(), d.status_code, media_type="text/event-stream",
                                     background=BackgroundTask(d.aclose))
        await asyncio.wait({p_task}, timeout=10.0)
        return Response(d.content, d.status_code, media_type="application/json")

    async def ok(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[*(Route(r, relay, methods=["POST"]) for r in ROUTES),
                             Route("/health", ok), Route("/readiness", ok)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefill", nargs=2, action="append", metavar=("URL", "BOOTSTRAP_PORT"), required=True)
    p.add_argument("--decode", action="append", required=True)
    args = p.parse_args()
    app = build_app([(url, int(port)) for url, port in args.prefill], args.decode)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
