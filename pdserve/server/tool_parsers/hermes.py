"""Hermes (NousResearch) format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

from pdserve.server.tool_parsers.base import ToolParser


class HermesParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"
    arguments_key = "arguments"
