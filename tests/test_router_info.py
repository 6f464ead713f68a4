"""``pdserve router`` answers a server's informational routes for the model it fronts (P/D mode,
real servers): ``/model_info``, ``/server_info``, ``/v1/models`` with ``root`` and
``max_model_len``, ``/tokenize`` and ``/detokenize``, the same as a mixed server of that model."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from aiohttp import web

from pdserve.router.config import WorkerSpec
from tests.client_fleet import ClientFleet, client_fleet
from tests.router_harness import free_port, router_client


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with client_fleet(tmp_path_factory.mktemp("router-info")) as f:
        yield f


def get(server, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=10)


def test_model_info_is_the_servers(fleet: ClientFleet):
    direct = get(fleet.mixed, "/model_info").json()
    for path in ("/model_info", "/get_model_info"):
        r = get(fleet.router, path)
        assert r.status_code == 200, r.text
        assert r.json() == direct
    assert os.path.isabs(direct["tokenizer_path"]) and os.path.isdir(direct["tokenizer_path"])


def test_model_info_is_read_once_per_admission():
    """The router asks a worker's ``/model_info`` once, not on every client call."""
    asyncio.run(_model_info_cached())


async def _model_info_cached() -> None:
    hits: list[str] = []

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def server_info(request: web.Request) -> web.Response:
        return web.json_response({"dp_size": 1, "disaggregation_mode": "null", "served_model_name": "fake",
                                  "model_path": "/models/fake", "context_length": 77})

    async def model_info(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"model_path": "/models/fake", "tokenizer_path": "/models/fake"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/model_info", model_info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with router_client([WorkerSpec(f"http://127.0.0.1:{port}", "mixed")]) as (c, _):
            answers = [(await c.get(path)).json() for path in ("/model_info", "/get_model_info", "/model_info")]
            assert answers == [{"model_path": "/models/fake", "tokenizer_path": "/models/fake"}] * 3
            assert hits == ["/model_info"]
            model = (await c.get("/v1/models")).json()["data"][0]
            assert (model["root"], model["max_model_len"]) == ("/models/fake", 77)
    finally:
        await runner.cleanup()


def test_v1_models_has_root_and_max_model_len(fleet: ClientFleet):
    direct = get(fleet.mixed, "/v1/models").json()["data"][0]
    model = get(fleet.router, "/v1/models").json()["data"][0]
    assert model["id"] == direct["id"]
    assert model["root"] == direct["root"] and os.path.isabs(model["root"])
    assert model["max_model_len"] == direct["max_model_len"] > 0


def test_server_info_is_a_servers_plus_both_sides(fleet: ClientFleet):
    info = get(fleet.router, "/server_info").json()
    direct = get(fleet.decode, "/server_info").json()
    for key in ("model_path", "tokenizer_path", "served_model_name", "context_length", "page_size", "dp_size"):
        assert info[key] == direct[key], key
    assert info["router"] == "pdserve" and len(info["workers"]) == 2
    assert [w["disaggregation_mode"] for w in info["prefill"]] == ["prefill"]
    assert [w["disaggregation_mode"] for w in info["decode"]] == ["decode"]
    assert get(fleet.router, "/get_server_info").json()["model_path"] == info["model_path"]
    assert get(fleet.router, "/version").json()["version"] == direct["version"]


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize_are_forwarded(fleet: ClientFleet, prefix: str):
    body = {"prompt": "Hello, world", "add_special_tokens": True}
    direct = httpx.post(fleet.mixed.url + prefix + "/tokenize", json=body, timeout=10).json()
    routed = httpx.post(fleet.router.url + prefix + "/tokenize", json=body, timeout=10)
    assert routed.status_code == 200, routed.text
    assert routed.json() == direct and direct["count"] == len(direct["tokens"]) > 0
    text = httpx.post(fleet.router.url + prefix + "/detokenize", json={"tokens": direct["tokens"][-3:]},
                      timeout=10)
    assert text.status_code == 200 and text.json() == httpx.post(
        fleet.mixed.url + prefix + "/detokenize", json={"tokens": direct["tokens"][-3:]}, timeout=10).json()


def test_tokenize_errors_are_the_servers(fleet: ClientFleet):
    r = httpx.post(fleet.router.url + "/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert r.status_code == 400 and "tokens" in r.text, r.text
