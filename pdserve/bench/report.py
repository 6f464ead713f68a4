"""The printed result table and the JSON result file of a serving benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import PERCENTILES

WIDTH = 50
LABEL_WIDTH = 40
SECTIONS = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)


def _value(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.{digits}f}"


def _row(label: str, value: Any, digits: int = 2) -> str:
    return f"{label:<{LABEL_WIDTH}}{_value(value, digits)}"


def format_table(metrics: dict[str, Any], title: str = "Serving Benchmark Result",
                 max_concurrency: int | None = None, request_rate: float | None = None) -> str:
    """The metrics as a fixed-width table in the style of ``vllm bench serve``."""
    lines = [f" {title} ".center(WIDTH, "=")]
    lines.append(_row("Successful requests:", metrics["completed"]))
    lines.append(_row("Failed requests:", metrics["failed"]))
    if request_rate is not None:
        lines.append(_row("Request rate configured (RPS):", request_rate))
    lines.append(_row("Maximum request concurrency:", max_concurrency))
    lines.append(_row("Max concurrency seen:", metrics["max_concurrency_seen"]))
    lines.append(_row("Benchmark duration (s):", metrics["duration_s"]))
    lines.append(_row("Total input tokens:", metrics["total_input_tokens"]))
    lines.append(_row("Total generated tokens:", metrics["total_output_tokens"]))
    lines.append(_row("Request throughput (req/s):", metrics["request_throughput"]))
    lines.append(_row("Input token throughput (tok/s):", metrics["input_throughput"]))
    lines.append(_row("Output token throughput (tok/s):", metrics["output_throughput"]))
    lines.append(_row("Total token throughput (tok/s):", metrics["total_token_throughput"]))
    if metrics.get("slo"):
        limits = ", ".join(f"{k} <= {v:g} ms" for k, v in metrics["slo"].items())
        lines.append(_row("SLO limits:", limits))
        lines.append(_row("SLO attainment (%):", 100.0 * metrics["slo_attainment"]))
        lines.append(_row("Request goodput (req/s):", metrics["request_goodput"]))
    for key, heading, short in SECTIONS:
        lines.append(f"{heading}".center(WIDTH, "-"))
        lines.append(_row(f"Mean {short} (ms):", metrics[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms):", metrics[f"median_{key}_ms"]))
        for p in PERCENTILES:
            lines.append(_row(f"P{p} {short} (ms):", metrics[f"p{p}_{key}_ms"]))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` (metrics, args, per-request records) to ``path``, creating its folder."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
