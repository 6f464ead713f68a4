"""The one error type the server raises for a failed request, rendered per API flavour.

Native routes answer ``{"error": {"message", "code"}}``, OpenAI routes
``{"error": {"message", "type", "param", "code"}}``; the status code is the same either way.
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


RETRYABLE_HEADER = "X-Pdserve-Retryable"  # on every error answer: may a router retry it elsewhere?


class ServerError(Exception):
    """A request failed; ``message`` names the problem (the field, the allowed range).

    ``retryable`` says whether the same request may succeed on another server or rank: by default
    5xx, 408 and 429 are (the server's trouble) and other 4xx are not (the request's). A 5xx the
    request itself caused passes ``retryable=False``; answers carry it as :data:`RETRYABLE_HEADER`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retryable = (status >= 500 or status in (408, 429)) if retryable is None else retryable

    @property
    def headers(self) -> dict[str, str]:
        return {RETRYABLE_HEADER: "true" if self.retryable else "false"}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code or self.status,
            }
        }

    def native_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.status}
        if self.param is not None:
            body["param"] = self.param
        return {"error": body}


def bad_request(message: str, param: str | None = None) -> ServerError:
    return ServerError(400, message, param)
