"""A very fast STUB upstream for measuring router cost alone: it answers every generation call at
once with a fixed one-token reply and computes nothing. It is not a model server; results
measured with it must be labelled as stub results.

``python -m pdserve.bench.stub_server --port P [--mode prefill|decode|null] [--bootstrap-port B]``

It answers what pdserve router and sglang-router 0.3.2 read at startup (``/health``,
``/server_info`` with an absolute local ``model_path``, ``/model_info``, ``/get_load``).
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

from pdserve.cli_help import HelpFormatter

REPLY = {"text": "a", "output_ids": [5],
         "meta_info": {"id": "stub", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 4,
                       "completion_tokens": 1, "cached_tokens": 0, "e2e_latency": 0.0}}


def make_app(mode: str, bootstrap_port: int | None, model_path: str) -> web.Application:
    info = {"model_path": model_path, "tokenizer_path": model_path, "served_model_name": "stub", "dp_size": 1,
            "tp_size": 1, "disaggregation_mode": mode, "disaggregation_bootstrap_port": bootstrap_port}
    model_info = {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True}
    reply = json.dumps(REPLY).encode()
    load = json.dumps([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]).encode()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(status=200)

    def fixed(obj: dict | bytes):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()

        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")
        return handler

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/health_generate", ok)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, fixed(info))
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, fixed(model_info))
    app.router.add_get("/get_load", fixed(load))
    app.router.add_get("/v1/models", fixed({"object": "list", "data": [{"id": "stub", "object": "model"}]}))
    app.router.add_post("/generate", generate)
    app.router.add_post("/abort_request", fixed({"aborted": 0}))
    return app


def main(argv: list[str] | None = None) -> int:
    from pdserve.models.tiny import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--mode", choices=("prefill", "decode", "null"), default="null", help="server role it plays")
    p.add_argument("--bootstrap-port", type=int, default=None, help="bootstrap port it reports (prefill)")
    args = p.parse_args(argv)
    mode = None if args.mode == "null" else args.mode
    web.run_app(make_app(mode, args.bootstrap_port, default_model_path()), host="127.0.0.1", port=args.port,
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
