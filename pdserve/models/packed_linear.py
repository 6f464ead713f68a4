"""Linears whose weight oneDNN packs once at load, so no call reorders it (CPU only).

``torch.nn.functional.linear`` hands oneDNN (bf16) or MKL (fp32) a plain ``[out, in]`` weight on every
call; at decode shapes (<= 32 rows) that costs as much as the product. :func:`pack_linears` gives each
CPU ``nn.Linear`` a copy of its weight in oneDNN's own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and runs it through ``torch.ops.mkldnn._linear_pointwise``
(what Inductor's CPU freezing pass emits). Measured at the 135M shapes on an AVX512-BF16 CPU (1 thread,
docs/benchmarks.md result 13b) the packed product is faster at 1, 32 and 512 rows in bf16 and at 32 and
512 rows in fp32 (single fp32 rows keep ``F.linear`` but for large weights). :func:`pack_linears` frees
each plain weight no other module shares (a tied LM head keeps the embedding's), so a model's linears
are held once, packed; its ``weight`` parameter becomes an empty tensor of the same dtype and device.
Nothing is packed on CUDA, without oneDNN, for bf16 on a CPU that does not compute bf16 natively
(:func:`~pdserve.models.cpu_features.bf16_isa`), or with ``PDSERVE_PACK_LINEAR=0``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.models.cpu_features import bf16_isa

log = logging.getLogger(__name__)


# fp32 products of one row with a weight smaller than this many elements run F.linear: at the 135M shapes
# the packed one was slower there (o 0.047 vs 0.030 ms, down 0.070 vs 0.062), faster for the LM head's
# 28M (8.1 vs 10.3 ms) and at 32 rows for every weight (result 13b)
FP32_ONE_ROW_PLAIN_BELOW = 8 << 20


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters) that multiplies by its oneDNN-packed weight ``packed``; inputs
    it was not packed for (another dtype or device, the model moved after packing) take ``F.linear``."""

    packed: torch.Tensor
    has_plain: bool  # False once pack_linears freed the plain weight (only the packed one is left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if x.device.type != "cpu" or x.dtype != packed.dtype or self.weight.dtype != packed.dtype:
            if not self.has_plain:
                raise RuntimeError(f"this linear holds only its oneDNN-packed {packed.dtype} weight on the CPU; "
                                   f"it cannot take a {x.dtype} input on {x.device} (load the model again)")
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if (x2.shape[0] == 1 and packed.dtype == torch.float32 and self.has_plain
                and self.weight.numel() < FP32_ONE_ROW_PLAIN_BELOW):
            return F.linear(x, self.weight, self.bias)  # fp32 single rows: MKL's plain product measured faster
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, self.bias, "none", [], "")
        return y.view(*lead, y.shape[-1])


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`pack_linears` packs linears of ``dtype`` on ``device``."""
    if device.type != "cpu" or os.environ.get("PDSERVE_PACK_LINEAR", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return bf16_isa() is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_linear(linear: nn.Linear, free_plain: bool = False) -> bool:
    """Pack one linear in place (its class becomes :class:`PackedLinear`); False where not supported.
    ``free_plain``: replace the plain weight by an empty tensor (the caller knows nothing else reads it)."""
    weight = linear.weight
    if isinstance(linear, PackedLinear) or not packing_supported(weight.dtype, weight.device):
        return False
    if linear.bias is not None and linear.bias.dtype != weight.dtype:
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, linear.bias, "none", [], "")
    except RuntimeError as exc:  # an op this build or CPU lacks: keep F.linear
        log.info("linear packing unavailable (%s): using F.linear", exc)
        return False
    linear.__class__ = PackedLinear
    linear.packed = packed
    linear.has_plain = True
    if free_plain:
        linear.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
        linear.has_plain = False
    return True


def pack_linears(model: nn.Module) -> int:
    """Pack every ``nn.Linear`` of ``model`` that :func:`packing_supported` allows, freeing each plain
    weight that no other module shares (tied embeddings keep theirs); returns how many were packed."""
    linears = [m for m in list(model.modules()) if type(m) is nn.Linear]
    uses: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            uses[param.data_ptr()] = uses.get(param.data_ptr(), 0) + 1
    return sum(pack_linear(m, free_plain=uses.get(m.weight.data_ptr(), 0) <= 1) for m in linears)
