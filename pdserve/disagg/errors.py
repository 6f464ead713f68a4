"""Errors the P/D managers raise to their caller (the server maps ``status`` to HTTP)."""

from __future__ import annotations

from pdserve.engine.request import RequestError


class RoomConflictError(RequestError):
    """A request names a ``bootstrap_room`` that is already active here (HTTP 409)."""

    status = 409


# HTTP status of a request whose P/D pairing failed (peer down, timeout, transfer error, peer abort)
# before any token: a 5xx lets a router retry the request with a fresh pair.
PD_FAILURE_STATUS = 503
