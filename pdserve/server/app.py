"""FastAPI app factory: routes, error rendering, API-key check, and the worker lifecycle.

The lifespan spawns the workers and returns at once, so the HTTP port is open (``/health``
answering 503) while models load; a background task flips the server to healthy when every
rank has reported ready and the tokenizer is loaded. Shutdown stops and joins the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from pdserve import __version__
from pdserve.http_common import API_KEY_MESSAGE, ApiKeyMiddleware
from pdserve.server import api_native, api_openai
from pdserve.server.config import ServerConfig
from pdserve.server.errors import ServerError
from pdserve.server.state import ServerState

OPEN_PATHS = frozenset({"/health", "/metrics"})

logger = logging.getLogger("pdserve.server")


def _reject_api_key(path: str) -> JSONResponse:
    error = ServerError(401, API_KEY_MESSAGE, code="invalid_api_key")
    return JSONResponse(error.openai_body() if path.startswith("/v1/") else error.native_body(), status_code=401)


def _render(request: Request, error: ServerError) -> JSONResponse:
    body = error.openai_body() if request.url.path.startswith("/v1/") else error.native_body()
    headers = error.headers
    if error.status >= 500 and error.status != 503:
        # after an unexpected error the connection's state is unknown: say it closes (a 4xx keeps it)
        headers = {**headers, "Connection": "close"}
    return JSONResponse(body, status_code=error.status, headers=headers)


def create_app(config: ServerConfig) -> FastAPI:
    """The server's ASGI app; ``app.state.server`` holds its :class:`ServerState`."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.controller.start()
        startup = asyncio.create_task(state.finish_startup(), name="pdserve-startup")
        try:
            yield
        finally:
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await startup
            if state.service is not None:
                state.service.close()
            await state.controller.shutdown()
            logger.info("all workers stopped")

    app = FastAPI(title="pdserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.include_router(api_native.router)
    app.include_router(api_openai.router)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        state.refused(request, exc)
        return _render(request, exc)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client left while sending its body: nobody reads the answer, nothing went wrong here
        error = ServerError(499, "client disconnected while sending the request body")
        state.refused(request, error)
        return _render(request, error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        error = ServerError(500, f"internal error: {type(exc).__name__}: {exc}")
        state.refused(request, error)
        return _render(request, error)

    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, open_paths=OPEN_PATHS,
                           rejection=_reject_api_key)
    return app
