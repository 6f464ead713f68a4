"""The native CPU decode kernel reads K/V in place from scattered pages and matches the PyTorch
gather path (SDPA over padded groups) for float32 and bfloat16, GQA and non-GQA, ragged lengths."""

from __future__ import annotations

import pytest
import torch

from pdserve.models import native
from pdserve.models.attention import AttentionMetadata, _decode_group

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: native kernel unavailable")


@pytest.mark.parametrize("dtype,heads,kv_heads", [(torch.float32, 9, 3), (torch.float32, 4, 4),
                                                  (torch.bfloat16, 8, 2)])
def test_native_decode_matches_gather_path(dtype, heads, kv_heads):
    torch.manual_seed(0)
    page_size, dim, num_pages = 16, 64, 120
    kv = torch.randn(num_pages, 2, page_size, kv_heads, dim).to(dtype)
    lens = [1, 5, 16, 17, 300, 129, 64]
    order = torch.randperm(num_pages).tolist()  # pages scattered across the pool
    pages = [[order.pop() for _ in range((n + page_size - 1) // page_size)] for n in lens]
    meta = AttentionMetadata.build(page_size, pages, lens, [], torch.device("cpu"))
    q = torch.randn(len(lens), heads, dim).to(dtype)
    assert native.supports(q, kv)
    ours, reference = torch.empty_like(q), torch.empty_like(q)
    table, rows, kv_lens = meta.decode_tables
    native.paged_attention(q, kv, table, rows, kv_lens, dim**-0.5, ours)
    for group in meta.decode_groups:
        _decode_group(q, kv, group, meta.workspace, dim**-0.5, reference)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol)


def test_unsupported_inputs_fall_back():
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    kv = torch.randn(4, 2, 16, 2, 64, dtype=torch.float16)
    assert not native.supports(q, kv)  # float16 goes to the gather path
