"""The one interface every step-time model implements, and the ``--simulate`` spec parser.

A step is described by :class:`StepShape`: the context length of each decoding request (the
tokens whose KV it reads, its new one included) and the ``(start, length)`` of each prefill
chunk. ``--simulate`` takes a hardware name (``H100-SXM``: :mod:`.roofline`) or
``profile:FILE`` (:mod:`.profiled`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pdserve.sim.model_shape import ModelShape


@dataclass
class StepShape:
    decode_contexts: list[int] = field(default_factory=list)
    extends: list[tuple[int, int]] = field(default_factory=list)  # (start, length) of each prefill chunk

    @property
    def num_tokens(self) -> int:
        return len(self.decode_contexts) + sum(n for _, n in self.extends)

    @property
    def num_requests(self) -> int:
        return len(self.decode_contexts) + len(self.extends)


class CostModel(ABC):
    """Seconds one engine step takes, and how many KV tokens fit on the simulated device."""

    name: str

    @abstractmethod
    def step_seconds(self, step: StepShape) -> float: ...

    @abstractmethod
    def kv_capacity_tokens(self) -> int | None:
        """KV tokens that fit beside the weights, or None to keep the engine's own sizing."""

    def describe(self) -> dict:
        return {"name": self.name}


def make_cost_model(spec: str, shape: ModelShape, tp_size: int = 1, mem_fraction: float = 0.9) -> CostModel:
    """``HARDWARE`` (roofline) or ``profile:FILE`` (profiled); raises SimConfigError naming the value."""
    if spec.startswith("profile:"):
        from pdserve.sim.profiled import ProfiledCost

        return ProfiledCost.load(spec[len("profile:"):])
    from pdserve.sim.hardware import get_hardware
    from pdserve.sim.roofline import RooflineCost

    return RooflineCost(shape, get_hardware(spec), tp_size, mem_fraction)
