"""Counters of one P/D manager, read by the server's ``/metrics``."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class TransferStats:
    """Transfer bytes, a transfer-latency histogram and failures by cause (thread-safe)."""

    transfer_bytes: int = 0
    transfers: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.transfer_bytes += nbytes
            self.transfers += 1
            self.latency_sum_s += seconds
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    def record_failure(self, cause: str) -> None:
        with self._lock:
            self.failures[cause] += 1

    def snapshot(self) -> dict:
        """Plain numbers; ``latency_buckets`` are cumulative ``(le, count)`` pairs as Prometheus wants."""
        with self._lock:
            cumulative, total = [], 0
            for le, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.latency_counts):
                total += count
                cumulative.append((le, total))
            return {
                "transfer_bytes": self.transfer_bytes,
                "transfers": self.transfers,
                "latency_buckets": cumulative,
                "latency_sum_s": self.latency_sum_s,
                "failures": dict(self.failures),
            }
