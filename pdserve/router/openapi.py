"""The router's OpenAPI document, built from its routes: the forwarded bodies carry the servers'
request schemas (``pdserve/request_bodies.py``) less the fields the router sets itself, the admin
routes their query parameters."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute, Route

from pdserve import __version__
from pdserve.request_bodies import (
    ROUTE_PATHS,
    DetokenizeBody,
    TokenizeBody,
    openapi_request_body,
    request_schema,
    struct_schema,
)

QUERY_PARAMETERS: dict[str, list[tuple[str, bool]]] = {  # path -> (name, required)
    "/add_worker": [("url", True), ("type", False), ("worker_type", False), ("bootstrap_port", False)],
    "/remove_worker": [("url", True)],
}
OTHER_BODIES = {"/tokenize": TokenizeBody, "/v1/tokenize": TokenizeBody,  # forwarded to a worker as they are
                "/detokenize": DetokenizeBody, "/v1/detokenize": DetokenizeBody}
RESPONSES = {"default": {"description": "JSON; an error is {\"error\": {\"message\", \"code\"}} naming the cause"}}


def openapi_document(routes: list[BaseRoute], replaced: frozenset[str]) -> dict[str, Any]:
    """OpenAPI 3.1 for ``routes`` (Starlette routes; ``/openapi.json`` itself is left out); ``replaced``:
    the body fields this router sets itself."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or route.path == "/openapi.json":
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation: dict[str, Any] = {"operationId": f"{method.lower()}{route.path.replace('/', '_')}",
                                         "responses": RESPONSES}
            if route.path in ROUTE_PATHS:
                operation.update(openapi_request_body(request_schema(ROUTE_PATHS[route.path], replaced)))
            elif route.path in OTHER_BODIES:
                operation.update(openapi_request_body(struct_schema(OTHER_BODIES[route.path])))
            if route.path in QUERY_PARAMETERS:
                operation["parameters"] = [{"name": name, "in": "query", "required": required,
                                            "schema": {"type": "string"}}
                                           for name, required in QUERY_PARAMETERS[route.path]]
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {"openapi": "3.1.0", "info": {"title": "pdserve router", "version": __version__}, "paths": paths}
