"""The fused element-wise kernels (SiLU-and-multiply, residual add + RMSNorm, RoPE) match the PyTorch
expressions they replace, at ragged sizes (vector tails), large magnitudes and one row: float32 within
2e-6; RMSNorm and RoPE also in bfloat16, rounded where torch rounds (nearly every element identical, none
more than one bf16 step off)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.models import native
from pdserve.models.rope import rotate

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: native kernels unavailable")
TOL = dict(atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("rows,inter", [(1, 8), (7, 768), (33, 1539)])
def test_silu_mul(rows, inter):
    torch.manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter) * 6
    gate_up[0, :4] = torch.tensor([-120.0, -88.0, 90.0, 0.0])  # exp under- and overflow ranges
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate) * up, **TOL)


@pytest.mark.parametrize("rows,inter", [(1, 8), (7, 768), (33, 1539)])
def test_silu_mul_bf16(rows, inter):
    """bf16 on a CPU with AVX512-BF16 (None elsewhere: the caller runs torch's ops), rounded where
    ``F.silu(gate) * up`` rounds: no element more than one bf16 step off (the exponentials differ in the
    last float32 bits), nearly all identical."""
    torch.manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter) * 6
    gate_up[0, :4] = torch.tensor([-120.0, -88.0, 90.0, 0.0])
    gate_up = gate_up.to(torch.bfloat16)
    ours = native.silu_mul(gate_up)
    if ours is None:
        assert native.bf16_variant() == "generic"  # only where the CPU lacks AVX512-BF16
        pytest.skip("no AVX512-BF16: torch's ops run instead")
    gate, up = gate_up.chunk(2, dim=-1)
    reference = F.silu(gate) * up
    assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape
    torch.testing.assert_close(ours.float(), reference.float(), atol=1e-30, rtol=2**-7)
    assert (ours == reference).float().mean() > 0.99


@pytest.mark.parametrize("rows,dim", [(1, 8), (5, 256), (17, 573)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(rows, dim, with_residual):
    torch.manual_seed(1)
    x, residual, weight = torch.randn(rows, dim) * 3, torch.randn(rows, dim), torch.rand(dim) + 0.5
    summed = x + residual if with_residual else x.clone()
    expected = weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = native.add_rms_norm(x, residual if with_residual else None, weight, 1e-5)
    torch.testing.assert_close(x, summed, atol=0, rtol=0)  # the residual went into x in place
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("q_heads,k_heads,dim", [(8, 4, 32), (9, 3, 64), (2, 2, 8)])
def test_rope_from_fused_qkv_rows(q_heads, k_heads, dim):
    torch.manual_seed(2)
    rows = 11
    qkv = torch.randn(rows, (q_heads + 2 * k_heads) * dim)
    angles = torch.rand(rows, 1, dim // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    heads = qkv.view(rows, q_heads + 2 * k_heads, dim)
    q, k = native.rope(qkv, cos, sin, q_heads, k_heads, dim)
    assert q.is_contiguous() and k.is_contiguous()
    torch.testing.assert_close(q, rotate(heads[:, :q_heads], cos, sin), **TOL)
    torch.testing.assert_close(k, rotate(heads[:, q_heads : q_heads + k_heads], cos, sin), **TOL)


def assert_same_bf16(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 results of the same rounding steps: >= 99 % identical, the rest one bf16 step (2^-7 relative) off
    (float32 sums in another order may round the other way)."""
    assert ours.dtype == expected.dtype == torch.bfloat16 and ours.shape == expected.shape
    assert (ours == expected).float().mean() >= 0.99
    torch.testing.assert_close(ours.float(), expected.float(), atol=1e-30, rtol=2**-7)


@pytest.mark.parametrize("rows,dim", [(1, 8), (5, 256), (17, 573)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_bf16(rows, dim, with_residual):
    torch.manual_seed(1)
    bf16 = torch.bfloat16
    x, residual = (torch.randn(rows, dim) * 3).to(bf16), torch.randn(rows, dim).to(bf16)
    weight = (torch.rand(dim) + 0.5).to(bf16)
    summed = x + residual if with_residual else x.clone()
    x32 = summed.float()  # as the model's RMSNorm (and transformers') computes it
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16)
    out = native.add_rms_norm(x, residual if with_residual else None, weight, 1e-5)
    assert torch.equal(x, summed)  # the bf16 sum went into x in place
    assert_same_bf16(out, expected)


@pytest.mark.parametrize("q_heads,k_heads,dim", [(8, 4, 32), (9, 3, 64), (2, 2, 8)])
def test_rope_bf16(q_heads, k_heads, dim):
    torch.manual_seed(2)
    rows, bf16 = 11, torch.bfloat16
    qkv = torch.randn(rows, (q_heads + 2 * k_heads) * dim).to(bf16)
    angles = torch.rand(rows, 1, dim // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(bf16), torch.cat([angles.sin()] * 2, -1).to(bf16)
    heads = qkv.view(rows, q_heads + 2 * k_heads, dim)
    q, k = native.rope(qkv, cos, sin, q_heads, k_heads, dim)
    assert_same_bf16(q, rotate(heads[:, :q_heads], cos, sin))
    assert_same_bf16(k, rotate(heads[:, q_heads : q_heads + k_heads], cos, sin))
