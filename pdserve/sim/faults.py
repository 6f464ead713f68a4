"""Fault injection for sim servers: ``--inject-faults "transfer=0.2,slow_rank=1:4,transfer_slowdown=3"``.

Keys: ``prefill`` / ``transfer`` / ``decode`` = fraction of requests (chosen by a hash of the rid
or room, so a rerun fails the same ones) that fail at that point; ``slow_rank=R:F`` makes DP rank
``R`` a straggler whose steps take ``F`` times longer (repeatable); ``transfer_slowdown=F``
multiplies every simulated KV transfer time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from pdserve.sim.hardware import SimConfigError

FRACTION_KEYS = ("prefill", "transfer", "decode")


@dataclass(frozen=True)
class FaultPlan:
    prefill: float = 0.0
    transfer: float = 0.0
    decode: float = 0.0
    slow_ranks: dict[int, float] = field(default_factory=dict)
    transfer_slowdown: float = 1.0

    @classmethod
    def parse(cls, spec: str | None) -> FaultPlan:
        if not spec:
            return cls()
        values: dict = {"slow_ranks": {}}
        for item in spec.split(","):
            key, sep, raw = item.strip().partition("=")
            try:
                if not sep:
                    raise ValueError("expected key=value")
                if key in FRACTION_KEYS:
                    value = float(raw)
                    if not 0 <= value <= 1:
                        raise ValueError("a fraction must be in [0, 1]")
                    values[key] = value
                elif key == "slow_rank":
                    rank, _, factor = raw.partition(":")
                    values["slow_ranks"][int(rank)] = _factor(factor)
                elif key == "transfer_slowdown":
                    values[key] = _factor(raw)
                else:
                    raise ValueError(f"unknown key; known: {', '.join(FRACTION_KEYS)}, slow_rank, transfer_slowdown")
            except ValueError as e:
                raise SimConfigError(f"--inject-faults item {item!r}: {e}") from e
        return cls(**values)

    def rank_slowdown(self, rank: int) -> float:
        return self.slow_ranks.get(rank, 1.0)

    def hits(self, point: str, key: str | int) -> bool:
        """Whether the request (rid) or room at ``key`` fails at ``point``."""
        fraction = getattr(self, point)
        if fraction <= 0:
            return False
        h = zlib.crc32(f"{point}:{key}".encode()) / 0xFFFFFFFF
        return h < fraction


def _factor(raw: str) -> float:
    value = float(raw)
    if not 1 <= value < 1e6:
        raise ValueError(f"a slowdown factor must be in [1, 1e6), got {raw}")
    return value


class FaultInjector:
    """Applies a :class:`FaultPlan`'s request faults through the P/D managers' own abort paths, so
    the failure is exactly what a real failure at that point produces: ``prefill`` aborts the
    request on its prefill rank as it arrives (the paired decode answers 503 before any token),
    ``decode`` aborts it on its decode rank right after its first token."""

    def __init__(self, plan: FaultPlan, mode: str) -> None:
        self.plan = plan
        self.mode = mode
        self.labels: dict[str, str] = {}  # the rank's internal id -> the client's rid, which the plan hashes

    def after_add(self, disagg, rid: str, label: str | None = None) -> None:
        if label is not None:
            self.labels[rid] = label
        if self.mode == "prefill" and self.plan.hits("prefill", label or rid):
            disagg.abort(rid, "injected fault: prefill failed")

    def after_step(self, disagg, outputs: list) -> None:
        for out in outputs:
            label = self.labels.pop(out.rid, out.rid) if out.finished else self.labels.get(out.rid, out.rid)
            if self.mode == "decode" and out.new_token_ids and not out.finished and self.plan.hits("decode", label):
                disagg.abort(out.rid, "injected fault: decode failed")
