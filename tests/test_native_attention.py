"""The native CPU kernel reads K/V in place from scattered pages and matches the PyTorch paths (SDPA
over gathered, padded groups for decode; SDPA per chunk for prefill) for float32 and bfloat16, GQA and
non-GQA, ragged lengths, and a mixed batch of decode rows and prefill chunks with and without a
cached prefix."""

from __future__ import annotations

import pytest
import torch

from pdserve.models import attention, native
from pdserve.models.attention import AttentionMetadata, _decode_group
from pdserve.models.cpu_features import cpu_flags

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
    table, rows, kv_lens = meta.native_tables
    native.paged_attention(q, kv, table, rows, kv_lens, dim**-0.5, ours)
    for group in meta.decode_groups:
        _decode_group(q, kv, group, meta.workspace, dim**-0.5, reference)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol)


def test_unsupported_inputs_fall_back():
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    kv = torch.randn(4, 2, 16, 2, 64, dtype=torch.float16)
    assert not native.supports(q, kv)  # float16 goes to the gather path


def mixed_batch(page_size: int, num_pages: int) -> tuple[AttentionMetadata, int]:
    """Metadata of three decode rows and four prefill chunks (no prefix; a prefix ending mid-page; a
    long chunk over a long prefix; one token) on shuffled pages, and the batch's token count."""
    order = torch.randperm(num_pages).tolist()

    def take(n: int) -> list[int]:
        return [order.pop() for _ in range((n + page_size - 1) // page_size)]

    decode_lens = [3, 40, 257]
    extends = [(0, 37, take(37)), (21, 11, take(32)), (300, 140, take(440)), (0, 1, take(1))]
    decode_pages = [take(n) for n in decode_lens]
    meta = AttentionMetadata.build(page_size, decode_pages, decode_lens, extends, torch.device("cpu"))
    return meta, len(decode_lens) + sum(n for _, n, _ in extends)


@pytest.mark.parametrize("dtype,heads,kv_heads,dim", [(torch.float32, 9, 3, 64), (torch.float32, 8, 4, 32),
                                                      (torch.bfloat16, 8, 2, 64)])
def test_native_mixed_batch_matches_pytorch_path(monkeypatch, dtype, heads, kv_heads, dim):
    """Decode rows plus prefill chunks (no prefix; a prefix ending mid-page; a long chunk over a long
    prefix), attended in one native call, equal the SDPA paths; the K/V written are the same."""
    torch.manual_seed(1)
    page_size, num_pages = 16, 200
    meta, tokens = mixed_batch(page_size, num_pages)
    kv = torch.randn(num_pages, 2, page_size, kv_heads, dim).to(dtype)
    q = torch.randn(tokens, heads, dim).to(dtype)
    k = torch.randn(tokens, kv_heads, dim).to(dtype)
    v = torch.randn(tokens, kv_heads, dim).to(dtype)
    kv_native, kv_torch = kv.clone(), kv.clone()
    ours = attention.paged_attention(q, k, v, kv_native, meta, dim**-0.5)
    monkeypatch.setattr(native, "supports", lambda *_: False)
    reference = attention.paged_attention(q, k, v, kv_torch, meta, dim**-0.5)
    assert torch.equal(kv_native, kv_torch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol)


@pytest.fixture
def bf16_variant():
    """Switch the bf16 decode path for one test; the run-time choice is restored afterwards."""
    chosen = native.bf16_variant()
    yield native.bf16_variant
    native.bf16_variant(chosen)


def test_bf16_decode_path_is_chosen_by_the_cpu():
    expected = "avx512_bf16" if "avx512_bf16" in cpu_flags() else "generic"
    assert native.bf16_variant() == expected


@pytest.mark.parametrize("variant", native.BF16_VARIANTS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (16, 2, 64), (4, 1, 256),
                                                (6, 2, 40)])
def test_bf16_decode_variants_match_the_gather_path(bf16_variant, variant, heads, kv_heads, dim):
    """Both bf16 decode paths (the AVX512-BF16 one where the CPU has it; head_dim 40 is not a multiple of
    32 and takes the generic code in both) against SDPA over gathered float32 copies of the same bf16 K/V."""
    if bf16_variant(variant) != variant:
        pytest.skip(f"this CPU has no {variant}")
    torch.manual_seed(3)
    page_size, num_pages = 16, 160
    kv = torch.randn(num_pages, 2, page_size, kv_heads, dim).to(torch.bfloat16)
    lens = [1, 2, 15, 16, 17, 33, 300, 129, 500]
    order = torch.randperm(num_pages).tolist()
    pages = [[order.pop() for _ in range((n + page_size - 1) // page_size)] for n in lens]
    meta = AttentionMetadata.build(page_size, pages, lens, [], torch.device("cpu"))
    q = (torch.randn(len(lens), heads, dim) * 2).to(torch.bfloat16)
    ours, reference = torch.empty_like(q), torch.empty(q.shape)
    table, rows, kv_lens = meta.native_tables
    native.paged_attention(q, kv, table, rows, kv_lens, dim**-0.5, ours)
    for group in meta.decode_groups:
        _decode_group(q.float(), kv.float(), group, meta.workspace, dim**-0.5, reference)
    torch.testing.assert_close(ours.float(), reference, atol=1e-2, rtol=1e-2)  # bf16 output: 2^-8 relative


@pytest.mark.parametrize("variant", native.BF16_VARIANTS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (4, 4, 32), (4, 1, 256)])
def test_bf16_mixed_batch_variants_match_float32_sdpa(bf16_variant, variant, heads, kv_heads, dim):
    """Decode rows and prefill chunks (no prefix, a prefix ending mid-page, a chunk longer than a query
    tile over a long prefix, one token) in one bf16 call, both paths, against the SDPA paths run in
    float32 on the same bf16 values."""
    if bf16_variant(variant) != variant:
        pytest.skip(f"this CPU has no {variant}")
    torch.manual_seed(4)
    page_size, num_pages = 16, 120
    meta, tokens = mixed_batch(page_size, num_pages)
    kv = torch.randn(num_pages, 2, page_size, kv_heads, dim).to(torch.bfloat16)
    q, k, v = ((torch.randn(tokens, h, dim) * 2).to(torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    kv_native, kv_torch = kv.clone(), kv.float()
    ours = attention.paged_attention(q, k, v, kv_native, meta, dim**-0.5)
    reference = _reference_attention(q.float(), k.float(), v.float(), kv_torch, meta, dim**-0.5)
    assert torch.equal(kv_native.float(), kv_torch)  # the same K/V were written
    torch.testing.assert_close(ours.float(), reference, atol=1e-2, rtol=1e-2)


def _reference_attention(q, k, v, kv_layer, meta, scale):
    """The PyTorch gather + SDPA paths (float32)."""
    import unittest.mock

    with unittest.mock.patch.object(native, "supports", lambda *_: False):
        return attention.paged_attention(q, k, v, kv_layer, meta, scale)


@pytest.mark.parametrize("variant", native.BF16_VARIANTS)
@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 1, 32), (10, 2, 64), (6, 2, 96), (3, 1, 192), (2, 2, 128)])
def test_bf16_decode_blocks_pages_and_groups(bf16_variant, variant, page_size, heads, kv_heads, dim):
    """The blocked bf16 decode path (16 positions per block, prefetching ahead) on lengths around its block
    and prefetch distance and around page boundaries, page sizes that split or span a block, query groups
    of 1-8 per KV head (one or more passes over V), head_dim 32-192; against SDPA in float32."""
    if bf16_variant(variant) != variant:
        pytest.skip(f"this CPU has no {variant}")
    torch.manual_seed(5)
    lens = [1, 3, 7, 8, 9, 31, 32, 33, 47, 48, 49, 65, 95, 257]
    num_pages = sum((n + page_size - 1) // page_size for n in lens) + 4
    kv = torch.randn(num_pages, 2, page_size, kv_heads, dim).to(torch.bfloat16)
    order = torch.randperm(num_pages).tolist()
    pages = [[order.pop() for _ in range((n + page_size - 1) // page_size)] for n in lens]
    meta = AttentionMetadata.build(page_size, pages, lens, [], torch.device("cpu"))
    q = (torch.randn(len(lens), heads, dim) * 2).to(torch.bfloat16)
    ours, reference = torch.empty_like(q), torch.empty(q.shape)
    native.paged_attention(q, kv, *meta.native_tables, dim**-0.5, ours)
    for group in meta.decode_groups:
        _decode_group(q.float(), kv.float(), group, meta.workspace, dim**-0.5, reference)
    torch.testing.assert_close(ours.float(), reference, atol=1e-2, rtol=1e-2)  # bf16 output: 2^-8 relative
