"""Roofline step time from the model's shape and a :class:`~pdserve.sim.hardware.Hardware` entry.

Per step with ``T`` new tokens over ``n`` requests, tensor parallel over ``tp`` GPUs::

    flops   = 2 * P_matmul * T + 4 * L * d_attn * sum(pairs)      pairs = query-key pairs attended
    bytes   = weight_bytes + kv_bytes_per_token * sum(context read)
    compute = flops / (peak * mfu * tp)
    memory  = bytes / (bandwidth * eta * tp)
    step    = max(compute, memory) + allreduce + step_overhead + n * request_overhead
    allreduce (tp > 1) = 2 * L * (latency + 2 (tp-1)/tp * T * d * dtype_bytes / tp_link)

A prefill chunk ``(start, length)`` attends ``length * (start + (length + 1) / 2)`` pairs and reads
``start`` cached tokens; a decode of context ``c`` attends ``c`` pairs and reads ``c`` tokens.
"""

from __future__ import annotations

from pdserve.sim.cost_model import CostModel, StepShape
from pdserve.sim.hardware import Hardware, SimConfigError
from pdserve.sim.model_shape import ModelShape


class RooflineCost(CostModel):
    name = "roofline"

    def __init__(self, shape: ModelShape, hardware: Hardware, tp_size: int = 1, mem_fraction: float = 0.9) -> None:
        if tp_size < 1:
            raise SimConfigError(f"--tp-size must be >= 1, got {tp_size}")
        self.shape = shape
        self.hw = hardware
        self.tp = tp_size
        self.mem_fraction = mem_fraction
        free = self.kv_memory_bytes()
        if free <= 0:
            raise SimConfigError(
                f"the model's weights ({shape.weight_bytes / 1e9:.1f} GB) do not fit {tp_size} x {hardware.name} "
                f"({tp_size * hardware.memory * mem_fraction / 1e9:.1f} GB usable at --mem-fraction-static "
                f"{mem_fraction}); raise --tp-size or pick hardware with more memory"
            )

    def kv_memory_bytes(self) -> float:
        return self.tp * self.hw.memory * self.mem_fraction - self.shape.weight_bytes

    def kv_capacity_tokens(self) -> int:
        return int(self.kv_memory_bytes() // self.shape.kv_bytes_per_token)

    def decode_floor_seconds(self) -> float:
        """Weights read once at the datasheet bandwidth: the batch-1 decode lower bound."""
        return self.shape.weight_bytes / (self.hw.mem_bandwidth * self.tp)

    def parts(self, step: StepShape) -> dict[str, float]:
        s, hw = self.shape, self.hw
        tokens = step.num_tokens
        pairs = sum(step.decode_contexts) + sum(n * (start + (n + 1) / 2) for start, n in step.extends)
        read = sum(step.decode_contexts) + sum(start for start, _ in step.extends)
        flops = 2 * s.matmul_params * tokens + 4 * s.num_layers * s.attn_dim * pairs
        nbytes = s.weight_bytes + s.kv_bytes_per_token * (read + sum(n for _, n in step.extends))
        compute = flops / (hw.peak_flops * hw.prefill_mfu * self.tp)
        memory = nbytes / (hw.mem_bandwidth * hw.decode_bw_efficiency * self.tp)
        allreduce = 0.0
        if self.tp > 1:
            volume = 2 * (self.tp - 1) / self.tp * tokens * s.hidden_size * s.dtype_bytes
            allreduce = 2 * s.num_layers * (hw.allreduce_latency_s + volume / hw.tp_link_bandwidth)
        overhead = hw.step_overhead_s + step.num_requests * hw.request_overhead_s
        return {"compute": compute, "memory": memory, "allreduce": allreduce, "overhead": overhead}

    def step_seconds(self, step: StepShape) -> float:
        p = self.parts(step)
        return max(p["compute"], p["memory"]) + p["allreduce"] + p["overhead"]

    def describe(self) -> dict:
        return {"name": self.name, "hardware": self.hw.name, "tp_size": self.tp,
                "weight_gb": self.shape.weight_bytes / 1e9, "kv_capacity_tokens": self.kv_capacity_tokens()}
