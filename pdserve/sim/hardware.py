"""Accelerators a simulated rank can stand for: peak figures, efficiencies and links.

Peak numbers are dense bf16 (no sparsity) from NVIDIA's datasheets; the efficiency constants are
the calibrated ones of BLIS (inference-sim, ``hardware_config.json``: MFU 0.45 prefill) and a
measured ~77 % of the bandwidth ceiling for batch-1 decode (vLLM sweep, Llama-3.1-8B). The KV link
is the per-GPU RDMA NIC of a typical P/D deployment (400 Gb/s ConnectX-7 = 50 GB/s), the TP link
NVLink 4 (900 GB/s total, ~450 GB/s per direction) or NVLink 3 (600 GB/s) for the A100.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One GPU as the cost models see it. Rates in FLOP/s and bytes/s, memory in bytes."""

    name: str
    peak_flops: float  # dense bf16
    mem_bandwidth: float  # HBM
    memory: float
    prefill_mfu: float  # achieved share of peak_flops in prefill
    decode_bw_efficiency: float  # achieved share of mem_bandwidth in decode
    kv_link_bandwidth: float  # P/D KV transfer, per GPU
    kv_link_setup_s: float  # per transfer (RDMA registration/handshake share)
    tp_link_bandwidth: float  # NVLink, per direction, for TP all-reduce
    allreduce_latency_s: float  # fixed cost of one small all-reduce
    step_overhead_s: float  # per engine step (scheduling, launch)
    request_overhead_s: float  # per request in a step (sampling, bookkeeping)
    source: str


HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            name="H100-SXM", peak_flops=989e12, mem_bandwidth=3.35e12, memory=80e9,
            prefill_mfu=0.45, decode_bw_efficiency=0.77, kv_link_bandwidth=50e9, kv_link_setup_s=1e-3,
            tp_link_bandwidth=450e9, allreduce_latency_s=8e-6, step_overhead_s=126e-6, request_overhead_s=4e-6,
            source="NVIDIA H100 datasheet (SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s, 80 GB); "
                   "efficiencies: BLIS hardware_config.json, vLLM A100 sweep; overheads: BLIS trained model",
        ),
        Hardware(
            name="H200", peak_flops=989e12, mem_bandwidth=4.8e12, memory=141e9,
            prefill_mfu=0.45, decode_bw_efficiency=0.77, kv_link_bandwidth=50e9, kv_link_setup_s=1e-3,
            tp_link_bandwidth=450e9, allreduce_latency_s=8e-6, step_overhead_s=126e-6, request_overhead_s=4e-6,
            source="NVIDIA H200 datasheet (SXM: same die as H100, 4.8 TB/s HBM3e, 141 GB)",
        ),
        Hardware(
            name="A100-80G", peak_flops=312e12, mem_bandwidth=2.039e12, memory=80e9,
            prefill_mfu=0.45, decode_bw_efficiency=0.77, kv_link_bandwidth=25e9, kv_link_setup_s=1e-3,
            tp_link_bandwidth=300e9, allreduce_latency_s=10e-6, step_overhead_s=126e-6, request_overhead_s=4e-6,
            source="NVIDIA A100 datasheet (SXM 80GB: 312 TFLOP/s bf16 dense, 2,039 GB/s, NVLink3 600 GB/s)",
        ),
    )
}


class SimConfigError(ValueError):
    """A ``--simulate`` setting cannot be used; the message names the value and what is allowed."""


def get_hardware(name: str) -> Hardware:
    for key, hw in HARDWARE.items():
        if key.lower() == name.lower():
            return hw
    raise SimConfigError(
        f"unknown hardware {name!r} for --simulate; known: {', '.join(HARDWARE)} or profile:FILE"
    )
