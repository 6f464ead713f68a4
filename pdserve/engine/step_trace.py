"""``--step-trace PATH``: one JSON line per forward pass of an engine (its shape and its start and
end on the monotonic clock), so that step costs can be fitted from a *served* engine
(``pdserve bench profile --from-trace``) rather than from an engine timed alone.

The first line is a header (``{"format": ..., "rank", "kv_capacity_tokens", "page_size"}``); each
further line is ``{"decodes": [context, ...], "extends": [[start, length], ...], "start": s,
"end": s}``. Torch-free; works the same for the real runner and the sim runner.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

FORMAT = "pdserve-step-trace/1"


def trace_path(prefix: str, rank: int) -> str:
    return f"{prefix}.rank{rank}.jsonl"


class StepTrace:
    """Wraps ``runner.forward`` and writes one line per call (line-buffered, so a killed worker
    leaves every finished step on disk)."""

    def __init__(self, runner: Any, path: str, rank: int, kv_capacity_tokens: int, page_size: int) -> None:
        self.file: IO[str] = open(path, "w", buffering=1)  # noqa: SIM115 (open as long as the engine)
        self.file.write(json.dumps({"format": FORMAT, "rank": rank, "kv_capacity_tokens": kv_capacity_tokens,
                                    "page_size": page_size}) + "\n")
        forward = runner.forward

        def traced_forward(batch: Any) -> Any:
            start = time.monotonic()
            result = forward(batch)
            end = time.monotonic()
            self.file.write(json.dumps({"decodes": [r.seq_len for r in batch.decodes],
                                        "extends": [[c.start, c.length] for c in batch.extends],
                                        "start": round(start, 6), "end": round(end, 6)}) + "\n")
            return result

        runner.forward = traced_forward

    def close(self) -> None:
        self.file.close()


def read_trace(path: str) -> tuple[dict, list[dict]]:
    """The header and the step lines of one trace file; ValueError naming the file if it is not one."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else None
        steps = [json.loads(line) for line in lines[1:]]
    except ValueError as e:
        raise ValueError(f"{path}: not a step trace ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a step trace (expected a first line with \"format\": \"{FORMAT}\")")
    return header, steps
