"""Tool calls: ``tools`` / ``tool_choice`` handling and one parser per model family's format.

With ``tool_choice`` ``"required"`` or a named function, the output is constrained by a JSON
schema (as vLLM does): a named function's output *is* its arguments object; ``required`` gives a
JSON array of ``{"name", "parameters"}`` objects. With ``"auto"`` the model writes free text and the
server's ``--tool-call-parser`` (one module per format here) extracts the calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pdserve.server.errors import bad_request
from pdserve.server.tool_parsers.base import ToolCall, ToolParser
from pdserve.server.tool_parsers.hermes import HermesParser
from pdserve.server.tool_parsers.llama3 import Llama3JsonParser
from pdserve.server.tool_parsers.qwen import QwenParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen": QwenParser,
    "qwen25": QwenParser,
    "llama3": Llama3JsonParser,
}

__all__ = ["PARSERS", "ToolCall", "ToolParser", "ToolPlan", "plan_tools", "parse_forced"]


@dataclass
class ToolPlan:
    """How one chat request uses its tools: ``mode`` is none, auto, required or named."""

    mode: str
    tools: list[dict[str, Any]]
    schema: str | None = None  # JSON schema constraining the output (required / named)
    function: str | None = None  # the named function
    schemas: list[Any] = field(default_factory=list)  # each tool's parameters, to check off the loop


def _check_tools(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, after checking each tool is a function with a JSON-Schema object
    (whether each compiles is checked in the grammar child: ``GenerationService.check_tool_schemas``)."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"{where}: only tools of type 'function' are supported", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{where}.function.name must be a non-empty string", "tools")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON Schema object", "tools")
        out[fn["name"]] = params
    return out


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool | None, parser: str | None) -> ToolPlan:
    """Validate ``tools`` / ``tool_choice`` (400 naming the field) and decide how to serve them."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan("none", [])
    schemas = _check_tools(tools)
    checks = [tool["function"].get("parameters", {"type": "object"}) for tool in tools]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", tools, schemas=checks)
    if choice == "auto":
        if parser is None:
            raise bad_request(
                "tools with tool_choice 'auto' need a server started with --tool-call-parser "
                f"({', '.join(sorted(PARSERS))}); or use tool_choice 'required' or a named function", "tool_choice"
            )
        return ToolPlan("auto", tools, schemas=checks)
    if choice == "required":
        item = {
            "anyOf": [
                {"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, params in schemas.items()
            ]
        }
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
        if parallel is False:
            array["maxItems"] = 1
        return ToolPlan("required", tools, schema=json.dumps(array), schemas=checks)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in schemas:
            raise bad_request(f"tool_choice names function {name!r}, which is not among tools", "tool_choice")
        return ToolPlan("named", tools, schema=json.dumps(schemas[name]), function=name, schemas=checks)
    raise bad_request(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def parse_forced(plan: ToolPlan, text: str) -> list[ToolCall]:
    """The calls in constrained output (required / named); [] if the output was cut short."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if plan.mode == "named":
        return [ToolCall(plan.function or "", json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, list):
        return []
    return [
        ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in value
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]
