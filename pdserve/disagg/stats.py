"""What a P/D manager reports to its server's front: per-request ``meta_info`` fields
(:class:`DisaggMeta`) and counters for ``/metrics`` (:class:`DisaggReport`). No heavy imports:
the front process loads this module."""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter

import msgspec

logger = logging.getLogger("pdserve.disagg")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DisaggMeta(msgspec.Struct):
    """P/D fields of a response's ``meta_info`` (``kv_wait_ms`` on decode only)."""

    bootstrap_room: int
    prefill_dp_rank: int | None = None
    decode_dp_rank: int | None = None
    kv_transfer_bytes: int = 0
    kv_transfer_ms: float = 0.0
    kv_wait_ms: float | None = None
    decode_cached_tokens: int | None = None  # leading prompt tokens decode reused instead of receiving


class DisaggReport(msgspec.Struct):
    """A snapshot: totals since start, ``latency_counts[i]`` transfers with latency in bucket ``i``
    of :data:`LATENCY_BUCKETS_S` (the last one: above every bound), rooms per waiting state now."""

    role: str
    transfer_bytes: int = 0
    transfers: int = 0
    latency_counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    failures: dict[str, int] = {}
    rooms: dict[str, int] = {}
    refusals: dict[str, int] = {}  # "listener:reason" -> connections or messages refused at a cap or auth check


class Refusals:
    """Counts what a listener refused (auth, caps, size limits); logs the first of each kind (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def record(self, listener: str, reason: str, detail: str = "") -> None:
        key = f"{listener}:{reason}"
        with self._lock:
            self.counts[key] += 1
            first = self.counts[key] == 1
        if first:
            logger.warning("%s refused %s%s (logged once; counted in /metrics as pdserve:refusals_total)",
                           listener, reason, f": {detail}" if detail else "")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class TransferStats:
    """Transfer bytes, a transfer-latency histogram and failures by cause (thread-safe)."""

    def __init__(self, role: str) -> None:
        self._lock = threading.Lock()
        self._report = DisaggReport(role)
        self._failures: Counter[str] = Counter()
        self.refusals = Refusals()

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            report = self._report
            report.transfer_bytes += nbytes
            report.transfers += 1
            report.latency_sum_s += seconds
            report.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    def record_failure(self, cause: str) -> None:
        with self._lock:
            self._failures[cause] += 1

    def snapshot(self, rooms: dict[str, int]) -> DisaggReport:
        with self._lock:
            report = self._report
            return DisaggReport(
                report.role, report.transfer_bytes, report.transfers, list(report.latency_counts),
                report.latency_sum_s, dict(self._failures), dict(rooms), self.refusals.snapshot(),
            )
