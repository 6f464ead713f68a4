"""HTTP plumbing shared by the server and the router: API-key middleware, bounded body reads."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_MESSAGE = "missing or invalid API key: send 'Authorization: Bearer <key>'"


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer KEY`` on every HTTP path but ``open_paths``; ``rejection(path)``
    builds the 401 response in the caller's error format."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: frozenset[str], rejection: Callable[[str], ASGIApp]
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths
        self.rejection = rejection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = dict(scope.get("headers") or [])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await self.rejection(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int, too_large: Callable[[str], Exception]) -> bytes:
    """The whole request body, refused with ``too_large(message)`` beyond ``limit`` bytes, whether
    the client declared its length or streams it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
