"""Serving-benchmark metric math: pure functions over per-request records.

Definitions (times in seconds inside records, milliseconds in the results):

- TTFT: request sent to first output token received.
- TPOT: ``(latency - ttft) / (output_len - 1)`` per request with more than one output token.
- ITL: every gap between consecutive token arrivals, pooled over all requests. A chunk that
  carries ``k`` tokens contributes ``k`` gaps of ``gap / k`` each.
- E2E latency: request sent to last byte of the response.
- SLO attainment: share of *all* requests (failed ones count as misses) that succeeded and meet
  every limit given (``ttft``, ``tpot``, ``e2el`` in ms).
- Goodput: requests meeting every limit per second of benchmark duration (as ``vllm bench serve``
  counts it); a request with one output token has TPOT 0 for this check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[int, ...] = (90, 99)
SLO_KEYS: tuple[str, ...] = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one benchmark request did; times in seconds, ``start`` relative to the benchmark start."""

    index: int
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    output_len_source: str = ""  # "server" (usage/meta_info) or "tokenizer"
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tpot(record: RequestRecord) -> float | None:
    """Mean time per output token after the first, or None with fewer than two tokens."""
    if record.output_len < 2:
        return None
    return (record.latency - record.ttft) / (record.output_len - 1)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and :data:`PERCENTILES` of values given in seconds, in milliseconds (None when empty)."""
    keys = ["mean", "median", *(f"p{p}" for p in PERCENTILES)]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    stats = [float(ms.mean()), float(np.percentile(ms, 50)), *(float(np.percentile(ms, p)) for p in PERCENTILES)]
    return dict(zip(keys, stats))


def parse_slo(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad goodput limit {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad goodput limit {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"bad goodput limit {item!r}: the limit must be > 0 ms")
        if key in slo:
            raise ValueError(f"goodput limit {key!r} given twice")
        slo[key] = ms
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """True when the request succeeded and is within every limit of ``slo`` (milliseconds)."""
    if not record.success:
        return False
    observed = {"ttft": record.ttft, "tpot": tpot(record) or 0.0, "e2el": record.latency}
    return all(observed[key] * 1000.0 <= limit for key, limit in slo.items())


def max_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals ``(start, end)`` open at one instant; an end at the same instant as a start
    closes first."""
    events = sorted(ev for start, end in intervals for ev in ((start, 1), (end, -1)))  # -1 sorts first
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, slo: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's metrics from its records and its wall-clock duration in seconds."""
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    metrics: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "max_concurrency_seen": max_concurrency((r.start, r.start + r.latency) for r in records),
    }
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        for stat, value in summarize_ms(values).items():
            metrics[f"{stat}_{name}_ms"] = value
    metrics["slo"] = dict(slo) if slo else None
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        metrics["good_requests"] = good
        metrics["slo_attainment"] = good / len(records) if records else 0.0
        metrics["request_goodput"] = per_s(good)
    else:
        metrics["good_requests"] = metrics["slo_attainment"] = metrics["request_goodput"] = None
    return metrics
