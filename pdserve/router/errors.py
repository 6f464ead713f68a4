"""Errors the router itself answers, shaped like the servers' (OpenAI flavour under ``/v1/``)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    502: "bad_gateway",
    503: "service_unavailable",
}


class RouterError(Exception):
    """A request the router refuses or cannot serve; ``message`` says why."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if path.startswith("/v1/"):
        kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code or status}}
    body: dict[str, Any] = {"message": message, "code": status}
    if code:
        body["type"] = code
    return {"error": body}


def error_response(path: str, status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, code), status_code=status)
