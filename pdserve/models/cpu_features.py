"""What this CPU runs natively, checked at run time: bf16 needs AMX-BF16 or AVX512-BF16.

Without either, bf16 matmuls are emulated (converted to float32 and back, slower than float32
itself: 0.9 GFLOP/s vs ~70 for a 1024-square GEMM on an AVX2 machine), so ``--dtype auto`` only
picks bf16 where :func:`bf16_isa` names an instruction set. ``PDSERVE_CPU_BF16=0`` makes it report
none (to run and measure the fallback on a machine that has bf16).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

AMX_BF16 = "amx_bf16"
AVX512_BF16 = "avx512_bf16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _torch_says(name: str) -> bool | None:
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if check is not None else None
    except RuntimeError:
        return None


def bf16_isa() -> str | None:
    """``"amx_bf16"`` or ``"avx512_bf16"`` where this CPU computes bf16 natively (best first), else None."""
    if os.environ.get("PDSERVE_CPU_BF16") == "0":
        return None
    flags = cpu_flags()
    amx = _torch_says("_is_amx_tile_supported")  # also checks the OS enabled the tile state
    if {"amx_bf16", "amx_tile"} <= flags and amx is not False:
        return AMX_BF16
    avx512_bf16 = _torch_says("_is_avx512_bf16_supported")
    if avx512_bf16 or (avx512_bf16 is None and "avx512_bf16" in flags):
        return AVX512_BF16
    return None


def cpu_isa() -> str:
    """The widest vector instruction set found: ``amx_bf16``, ``avx512_bf16``, ``avx512``, ``avx2``,
    or the machine name (what ``/server_info`` and the benchmarks report as the CPU path)."""
    best = bf16_isa()
    if best is not None:
        return best
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine() or "unknown"


def compute_path(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Which dtype and instruction-set path an engine runs: ``dtype``, ``device`` and, on CPU, ``cpu_isa``
    (the GEMMs' best: oneDNN uses AMX or AVX512-BF16 for bf16) and ``native_attention`` (the paged
    attention kernel: ``avx512_bf16``, ``generic`` C, or ``off``: PyTorch gather + SDPA)."""
    path = {"dtype": str(dtype).removeprefix("torch."), "device": device.type}
    if device.type != "cpu":
        return path
    from pdserve.models import native

    path["cpu_isa"] = cpu_isa()
    if native.kernels() is None or dtype not in native.NATIVE_DTYPES:
        path["native_attention"] = "off"
    else:
        path["native_attention"] = native.bf16_variant() if dtype == torch.bfloat16 else "generic"
    return path


def describe(path: dict[str, str]) -> str:
    """One line for logs: ``bfloat16 on cpu (cpu_isa amx_bf16, native_attention avx512_bf16)``."""
    extra = ", ".join(f"{k} {v}" for k, v in path.items() if k not in ("dtype", "device"))
    return f"{path['dtype']} on {path['device']}" + (f" ({extra})" if extra else "")
