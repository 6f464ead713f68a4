"""Small native CPU kernels, compiled on first use with the system C compiler and called via ctypes.

``paged_attention.c`` attends one query token per row directly over the KV pages (no gather copy);
its bfloat16 decode path uses AVX512-BF16 where the CPU has it, chosen at run time (compiled with a
target attribute, so the same source builds and runs on an AVX2 machine: :func:`bf16_variant`).
``elementwise.c`` fuses a layer's element-wise steps: residual add and RMSNorm, RoPE into contiguous
q/k (float32 and bfloat16), SiLU-and-multiply (float32, and bfloat16 with AVX512-BF16). The shared object is built once per source version and CPU into a cache folder
(``$PDSERVE_NATIVE_CACHE`` or ``~/.cache/pdserve/native``) with an atomic rename, so concurrent
processes never see half a file. When no compiler is present, or the build fails, :func:`kernels`
returns None and callers use their PyTorch path; ``PDSERVE_NATIVE=0`` forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.c", "elementwise.c")]
_HEADER = Path(__file__).with_name("simd.h")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("PDSERVE_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "native")
    return Path(root)


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` output depends on them), or the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.machine()


def _build(compiler: str) -> Path:
    code = b"".join(path.read_bytes() for path in (*_SOURCES, _HEADER))
    key = hashlib.sha256(code + " ".join(_FLAGS).encode() + _cpu_flags().encode())
    target = _cache_dir() / f"paged_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None when unavailable."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        if os.environ.get("PDSERVE_NATIVE", "1") == "0":
            return None
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            log.info("no C compiler found: paged attention uses the PyTorch gather path")
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("native paged attention unavailable (%s): using the PyTorch gather path", exc)
            return None
        fn = lib.pd_paged_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for name, args in (("pd_silu_mul", [ptr, ptr, i64, i64, c_int]), ("pd_silu_mul_bf16", [ptr, ptr, i64, i64, c_int]),
                           ("pd_add_rms_norm", [c_int, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, c_int]),
                           ("pd_rope", [c_int, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, c_int]),
                           ("pd_bf16_variant", [c_int])):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = args
        _loaded = lib
        return lib


NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_DIM = 256  # as in paged_attention.c
MAX_GROUP = 64


def supports(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Whether the native kernel can run this attention (CPU, float32/bfloat16, small enough heads)."""
    heads, kv_heads, dim = q.shape[1], kv_layer.shape[3], kv_layer.shape[4]
    return (q.device.type == "cpu" and q.dtype == kv_layer.dtype and q.dtype in NATIVE_DTYPES
            and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP and dim <= MAX_DIM and dim % 8 == 0
            and kv_layer.is_contiguous() and kernels() is not None)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_table: torch.Tensor,
                    row_of_token: torch.Tensor, kv_len: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Fill ``out`` [T, Hq, D] with attention of ``q`` [T, Hq, D] (contiguous) over the first
    ``kv_len[t]`` positions of ``block_table[row_of_token[t]]`` (int32 tensors)."""
    lib = kernels()
    assert lib is not None
    _, _, page_size, kv_heads, dim = kv_layer.shape
    rc = lib.pd_paged_attention(
        NATIVE_DTYPES[q.dtype], q.data_ptr(), kv_layer.data_ptr(), out.data_ptr(), block_table.data_ptr(),
        block_table.stride(0), row_of_token.data_ptr(), kv_len.data_ptr(), q.shape[0], q.shape[1], kv_heads,
        dim, page_size, scale, torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"native paged attention failed (code {rc})")


BF16_VARIANTS = ("generic", "avx512_bf16")


def bf16_variant(force: str | None = None) -> str | None:
    """The bfloat16 decode attention path in use: ``"avx512_bf16"`` (chosen where the CPU has it) or
    ``"generic"``; None without the library. ``force`` switches to one (tests and A/B runs compare both;
    ``avx512_bf16`` stays ``generic`` on a CPU without it)."""
    lib = kernels()
    if lib is None:
        return None
    return BF16_VARIANTS[lib.pd_bf16_variant(-1 if force is None else BF16_VARIANTS.index(force))]


def fused_ok(x: torch.Tensor) -> bool:
    """Whether the fused element-wise kernels take ``x`` (CPU float32 or bfloat16; the library built)."""
    return x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and kernels() is not None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of contiguous rows ``[gate | up]`` [T, 2I]: a new [T, I] tensor. float32 always;
    bfloat16 on a CPU with AVX512-BF16 (rounded where ``F.silu(gate) * up`` rounds), else None: the
    generic bf16 code measured slower than torch's ops (benchmarks/bf16_kernels.py), which callers use."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    fn = kernels().pd_silu_mul if gate_up.dtype == torch.float32 else kernels().pd_silu_mul_bf16
    if fn(gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads()) != 0:
        return None
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """With ``residual``, ``x += residual`` in place first; returns ``weight * x / rms(x)`` (rows of
    contiguous [T, D] tensors)."""
    rows, dim = x.shape
    out = torch.empty_like(x)
    kernels().pd_add_rms_norm(NATIVE_DTYPES[x.dtype], x.data_ptr(), None if residual is None else residual.data_ptr(),
                              weight.data_ptr(), out.data_ptr(), rows, dim, eps, torch.get_num_threads())
    return out


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, k_heads: int,
         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q [T, q_heads, D] and k [T, k_heads, D] (contiguous) from fused qkv rows [T, >= (q+k) * D]
    (rows contiguous) and per-token cos/sin tables [T, D]."""
    rows = qkv.shape[0]
    q = torch.empty(rows, q_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(rows, k_heads, head_dim, dtype=qkv.dtype)
    kernels().pd_rope(NATIVE_DTYPES[qkv.dtype], qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
                      q.data_ptr(), k.data_ptr(), rows, q_heads, k_heads, head_dim, torch.get_num_threads())
    return q, k
