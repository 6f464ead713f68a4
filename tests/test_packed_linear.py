"""oneDNN-packed linears equal ``F.linear`` (bf16 within bf16 rounding, fp32 within fp32 rounding), keep
their parameters, fall back on inputs they were not packed for, and are not used where the CPU lacks
native bf16 or packing is switched off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.models import packed_linear
from pdserve.models.packed_linear import PackedLinear, pack_linear, pack_linears, packing_supported


def _linear(dtype: torch.dtype, in_f: int, out_f: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(std=0.05)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 32, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, rows, bias):
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN packing for {dtype} on this CPU")
    lin = _linear(dtype, 576, 960, bias)
    x = torch.randn(rows, 576).to(dtype)
    reference = F.linear(x, lin.weight, lin.bias)
    assert pack_linear(lin) and isinstance(lin, PackedLinear)
    with torch.inference_mode():
        ours = lin(x)
        ours3 = lin(x.view(1, rows, 576))  # leading dims kept
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: a few ulps of outputs of size ~1
    torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol)
    assert ours3.shape == (1, rows, 960)
    torch.testing.assert_close(ours3[0], ours)
    assert not pack_linear(lin)  # idempotent


def test_fp32_single_rows_of_small_weights_take_f_linear(monkeypatch):
    if not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("no oneDNN packing on this CPU")
    lin = _linear(torch.float32, 64, 48, False)
    pack_linear(lin)
    calls = []
    real = packed_linear.F.linear
    monkeypatch.setattr(packed_linear.F, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 64)
    torch.testing.assert_close(lin(x), real(x, lin.weight), atol=1e-5, rtol=1e-5)
    assert calls == [1]
    lin(torch.randn(2, 64))
    assert calls == [1]  # two rows: the packed product


def test_packed_linear_falls_back_for_other_inputs():
    if not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("no oneDNN packing on this CPU")
    lin = _linear(torch.float32, 64, 48, True)
    pack_linear(lin)
    x = torch.randn(5, 64, dtype=torch.float64)
    lin.to(torch.float64)  # moved after packing: the stale packed weight is not used
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    xt = torch.randn(64, 5).t()  # not contiguous
    lin2 = _linear(torch.float32, 64, 48, False)
    reference = F.linear(xt, lin2.weight)
    pack_linear(lin2)
    torch.testing.assert_close(lin2(xt), reference, atol=1e-4, rtol=1e-4)


def test_pack_linears_keeps_parameters_and_skips_unsupported(monkeypatch):
    model = nn.Sequential(_linear(torch.float32, 32, 16, False), nn.ReLU(), _linear(torch.float32, 16, 8, True))
    names = [name for name, _ in model.named_parameters()]
    expected = 2 if packing_supported(torch.float32, torch.device("cpu")) else 0
    assert pack_linears(model) == expected
    assert [name for name, _ in model.named_parameters()] == names
    assert set(model.state_dict()) == set(names)  # the packed weight is not saved
    monkeypatch.setenv("PDSERVE_PACK_LINEAR", "0")
    assert pack_linears(nn.Sequential(_linear(torch.float32, 32, 16, False))) == 0


def test_bf16_is_not_packed_without_native_bf16(monkeypatch):
    monkeypatch.setattr(packed_linear, "bf16_isa", lambda: None)  # an AVX2-only CPU
    assert not packing_supported(torch.bfloat16, torch.device("cpu"))
    lin = _linear(torch.bfloat16, 32, 16, False)
    assert not pack_linear(lin) and type(lin) is nn.Linear
    assert not packing_supported(torch.float32, torch.device("cuda"))  # no packing on CUDA


def test_pack_linears_frees_unshared_plain_weights_and_keeps_tied_ones():
    if not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("no oneDNN packing on this CPU")

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(48, 32)
            self.proj = _linear(torch.float32, 32, 32, False)
            self.head = nn.Linear(32, 48, bias=False)
            self.head.weight = self.embed.weight  # tied, as an LM head

    model = Tied()
    x = torch.randn(3, 32)
    expected = model.head(model.proj(x))
    assert pack_linears(model) == 2
    assert model.proj.weight.numel() == 0 and not model.proj.has_plain  # held once: packed
    assert model.head.weight is model.embed.weight and model.head.has_plain  # the embedding still reads it
    with torch.inference_mode():
        torch.testing.assert_close(model.head(model.proj(x)), expected, atol=1e-4, rtol=1e-4)
        same_weight = _linear(torch.float32, 32, 32, False).weight  # _linear seeds: proj's weight again
        torch.testing.assert_close(model.proj(x[:1]), F.linear(x[:1], same_weight), atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="packed"):
            model.proj(x.double())  # nothing to fall back on: a named error, not a wrong answer
