"""Errors the P/D managers raise to their caller (the server maps ``status`` to HTTP)."""

from __future__ import annotations

from pdserve.engine.request import RequestError


class RoomConflictError(RequestError):
    """A request names a ``bootstrap_room`` that is already active here (HTTP 409)."""

    status = 409
