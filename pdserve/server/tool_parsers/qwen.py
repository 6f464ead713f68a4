"""Qwen 2.5 / Qwen 3 format: one ``<tool_call>\\n{"name", "arguments"}\\n</tool_call>`` block per call."""

from __future__ import annotations

from pdserve.server.tool_parsers.hermes import HermesParser


class QwenParser(HermesParser):
    """Qwen's chat templates use Hermes' tags and keys, one call per block, newline-wrapped."""
