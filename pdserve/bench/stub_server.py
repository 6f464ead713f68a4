"""A very fast STUB upstream for measuring router cost alone: it answers every generation call at
once with a fixed one-token reply and computes nothing. It is not a model server; results
measured with it must be labelled as stub results.

``python -m pdserve.bench.stub_server --port P [--mode prefill|decode|null] [--bootstrap-port B]``

It answers what pdserve router and sglang-router 0.3.2 read at startup (``/health``,
``/server_info`` with an absolute local ``model_path``, ``/model_info``, ``/get_load``). It is a
bare ``asyncio.Protocol`` with the httptools parser on uvloop (fixed answers prebuilt as bytes,
kept-alive connections, ``TCP_NODELAY``), so that the stubs cost the loop as little as possible
and the routers in front of them are what a benchmark measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

import httptools

from pdserve.cli_help import HelpFormatter
from pdserve.ports import listen_socket, no_delay

REPLY = {"text": "a", "output_ids": [5],
         "meta_info": {"id": "stub", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 4,
                       "completion_tokens": 1, "cached_tokens": 0, "e2e_latency": 0.0}}


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "OK")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body


def answers(mode: str | None, bootstrap_port: int | None, model_path: str) -> dict[tuple[bytes, bytes], bytes]:
    """(method, path) -> the whole response, prebuilt."""
    info = {"model_path": model_path, "tokenizer_path": model_path, "served_model_name": "stub", "dp_size": 1,
            "tp_size": 1, "disaggregation_mode": mode, "disaggregation_bootstrap_port": bootstrap_port}
    model_info = {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True}
    load = [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    models = {"object": "list", "data": [{"id": "stub", "object": "model", "root": model_path}]}
    fixed = {
        (b"GET", b"/health"): response(200, b""),
        (b"GET", b"/health_generate"): response(200, b""),
        (b"GET", b"/get_load"): response(200, json.dumps(load).encode()),
        (b"GET", b"/v1/models"): response(200, json.dumps(models).encode()),
        (b"POST", b"/generate"): response(200, json.dumps(REPLY).encode()),
        (b"POST", b"/abort_request"): response(200, b'{"aborted": 0}'),
    }
    for path in (b"/server_info", b"/get_server_info"):
        fixed[(b"GET", path)] = response(200, json.dumps(info).encode())
    for path in (b"/model_info", b"/get_model_info"):
        fixed[(b"GET", path)] = response(200, json.dumps(model_info).encode())
    return fixed


class StubProtocol(asyncio.Protocol):
    """One connection: every complete request gets its prebuilt answer (404 if none)."""

    def __init__(self, fixed: dict[tuple[bytes, bytes], bytes]) -> None:
        self.fixed = fixed
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            no_delay(sock)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        answer = self.fixed.get((self.parser.get_method(), path)) or response(404, b"{}")
        assert self.transport is not None
        self.transport.write(answer)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(sock: socket.socket, fixed: dict[tuple[bytes, bytes], bytes]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: StubProtocol(fixed), sock=sock)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    from pdserve.models.tiny import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--mode", choices=("prefill", "decode", "null"), default="null", help="server role it plays")
    p.add_argument("--bootstrap-port", type=int, default=None, help="bootstrap port it reports (prefill)")
    args = p.parse_args(argv)
    mode = None if args.mode == "null" else args.mode
    fixed = answers(mode, args.bootstrap_port, default_model_path())
    sock = listen_socket("127.0.0.1", args.port)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    runner(serve(sock, fixed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
