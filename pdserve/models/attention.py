"""Paged attention in plain PyTorch.

The KV cache of one layer is a tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]``:
page ``p`` of a layer (its K and V) is the contiguous block ``kv[p]``, which is what the P/D
transfer backends move. One forward step mixes decode rows (one new token each, attended in a
single padded batch) and extend rows (a prefill chunk each, attended one request at a time with
a causal mask offset by the cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExtendSpan:
    """One request's prefill chunk inside the flat token batch."""

    start: int  # first row of this chunk in the flat batch
    length: int  # number of new tokens in the chunk
    prefix_len: int  # tokens of this request already in the KV cache before the chunk
    pages: torch.Tensor  # LongTensor of the request's pages covering prefix + chunk
    mask: torch.Tensor | None  # bool [length, prefix+length] (True = attend); None when prefix is 0


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward step, shared by all layers.

    Rows ``[0, num_decode)`` of the flat batch are decode tokens; the rest belong to ``extends``.
    """

    page_size: int
    slot_pages: torch.Tensor  # LongTensor [T]: page receiving each new token's K/V
    slot_offsets: torch.Tensor  # LongTensor [T]: offset inside that page
    num_decode: int
    decode_page_table: torch.Tensor | None  # LongTensor [num_decode, max_pages]
    decode_mask: torch.Tensor | None  # bool [num_decode, 1, 1, max_pages * page_size]
    extends: list[ExtendSpan]

    @classmethod
    def build(
        cls,
        page_size: int,
        decode_pages: list[list[int]],
        decode_kv_lens: list[int],
        extend_rows: list[tuple[int, int, list[int]]],
        device: torch.device,
    ) -> AttentionMetadata:
        """Build metadata from plain lists.

        ``decode_pages[b]`` / ``decode_kv_lens[b]``: page list and context length (including the
        new token) of decode row ``b``. ``extend_rows``: ``(prefix_len, chunk_len, pages)`` per
        prefill chunk, in batch order after the decode rows.
        """
        slot_pages: list[int] = []
        slot_offsets: list[int] = []
        for pages, kv_len in zip(decode_pages, decode_kv_lens, strict=True):
            pos = kv_len - 1
            slot_pages.append(pages[pos // page_size])
            slot_offsets.append(pos % page_size)
        num_decode = len(decode_pages)
        table = mask = None
        if num_decode:
            max_pages = max(len(p) for p in decode_pages)
            table = torch.tensor([p + [0] * (max_pages - len(p)) for p in decode_pages], dtype=torch.long)
            lens = torch.tensor(decode_kv_lens, dtype=torch.long)
            mask = (torch.arange(max_pages * page_size)[None, :] < lens[:, None])[:, None, None, :]
            table, mask = table.to(device), mask.to(device)
        extends: list[ExtendSpan] = []
        start = num_decode
        for prefix_len, length, pages in extend_rows:
            for pos in range(prefix_len, prefix_len + length):
                slot_pages.append(pages[pos // page_size])
                slot_offsets.append(pos % page_size)
            span_mask = None
            if prefix_len:
                q_pos = torch.arange(prefix_len, prefix_len + length)[:, None]
                span_mask = (torch.arange(prefix_len + length)[None, :] <= q_pos).to(device)
            used = (prefix_len + length + page_size - 1) // page_size
            extends.append(
                ExtendSpan(start, length, prefix_len, torch.tensor(pages[:used], device=device), span_mask)
            )
            start += length
        return cls(
            page_size=page_size,
            slot_pages=torch.tensor(slot_pages, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            num_decode=num_decode,
            decode_page_table=table,
            decode_mask=mask,
            extends=extends,
        )


def _gather(kv_layer: torch.Tensor, pages: torch.Tensor, which: int) -> torch.Tensor:
    """K (which=0) or V (which=1) of ``pages`` as ``[..., len(pages) * page_size, heads, dim]``."""
    blocks = kv_layer[pages, which]  # [..., n, page_size, H, D]
    return blocks.flatten(-4, -3)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the pool, then attend. ``q``: [T, Hq, D]; ``k``/``v``: [T, Hkv, D]."""
    kv_layer[meta.slot_pages, 0, meta.slot_offsets] = k.to(kv_layer.dtype)
    kv_layer[meta.slot_pages, 1, meta.slot_offsets] = v.to(kv_layer.dtype)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decode
    if nd:
        keys = _gather(kv_layer, meta.decode_page_table, 0).transpose(1, 2)  # [B, H, L, D]
        values = _gather(kv_layer, meta.decode_page_table, 1).transpose(1, 2)
        query = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            query, keys.to(q.dtype), values.to(q.dtype), attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )
        out[:nd] = o.squeeze(2)
    for span in meta.extends:
        rows = slice(span.start, span.start + span.length)
        query = q[rows].transpose(0, 1)  # [Hq, L, D]
        if span.prefix_len == 0:
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            total = span.prefix_len + span.length
            keys = _gather(kv_layer, span.pages, 0)[:total].transpose(0, 1).to(q.dtype)
            values = _gather(kv_layer, span.pages, 1)[:total].transpose(0, 1).to(q.dtype)
            o = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=span.mask, scale=scale, enable_gqa=gqa
            )
        out[rows] = o.transpose(0, 1)
    return out
