"""Request arrival times: a Poisson process (exponential gaps) reproducible from a seed."""

from __future__ import annotations

import math

import numpy as np


def poisson_intervals(n: int, rate: float, seed: int) -> list[float]:
    """``n`` gaps in seconds drawn from an exponential of mean ``1 / rate``; all 0 for an infinite rate."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return [float(x) for x in rng.exponential(1.0 / rate, size=n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times of ``n`` requests relative to the start: the first at 0, then Poisson gaps."""
    if n == 0:
        return []
    gaps = poisson_intervals(n - 1, rate, seed)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]
