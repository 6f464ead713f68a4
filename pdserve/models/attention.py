"""Paged attention.

The KV cache of one layer is a tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]``:
page ``p`` of a layer (its K and V) is the contiguous block ``kv[p]``, which is what the P/D
transfer backends move. One forward step mixes decode rows (one new token each) and extend rows
(a prefill chunk each, attended one request at a time with a causal mask offset by the cached prefix).

On CPU every row, decode token or prefill chunk (with or without a cached prefix), is attended by one
call of the native kernel (:mod:`pdserve.models.native`), which reads K/V in place from the pages
through an int32 block table: no gather copy of the prefix, one call per layer for the whole batch.
Elsewhere (CUDA, float16, no compiler) decode rows are gathered into padded groups of similar length
and prefill chunks are attended one at a time with SDPA.

The gather paths copy positions a row must not see (padding past its length, the unwritten tail of
its last page) and mask them. A reused page may hold anything there, NaN or inf included (left by a
request whose forward went non-finite, or by a peer that sent garbage), and a masked NaN still
poisons SDPA (``-inf + NaN`` scores, ``0 * NaN`` values). So masked positions never read such a slot:
they gather the row's own first position instead, which it wrote before attending (same shapes,
no extra pass over the copy).

A decode step over static buffers (:mod:`pdserve.engine.decode_graphs`, CUDA graphs) passes its block
table as tensors (:class:`StaticDecode`): fixed shapes, no host data, so the step can be captured.
"""


from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from pdserve.models import native


class ExtendSpan:
    """One request's prefill chunk inside the flat token batch (page tensor and mask built on first use)."""

    def __init__(self, start: int, length: int, prefix_len: int, page_list: list[int], device: torch.device) -> None:
        self.start = start  # first row of this chunk in the flat batch
        self.length = length  # number of new tokens in the chunk
        self.prefix_len = prefix_len  # tokens of this request already in the KV cache before the chunk
        self.page_list = page_list  # the request's pages covering prefix + chunk
        self.device = device

    @cached_property
    def pages(self) -> torch.Tensor:
        return torch.tensor(self.page_list, device=self.device)

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """bool [length, prefix+length] (True = attend); None when the prefix is empty."""
        if not self.prefix_len:
            return None
        q_pos = torch.arange(self.prefix_len, self.prefix_len + self.length)[:, None]
        return (torch.arange(self.prefix_len + self.length)[None, :] <= q_pos).to(self.device)


@dataclass
class DecodeGroup:
    """Decode rows ``[start, start + size)`` of similar length, attended as one padded batch."""

    start: int
    size: int
    num_pages: int  # pages per row after padding
    k_slots: torch.Tensor  # LongTensor [size * num_pages * page_size]: K row gathered per position (see _masked_slots)
    v_slots: torch.Tensor  # the same for V
    visible: torch.Tensor  # bool [size, 1, 1, num_pages * page_size]: True = attend


class Workspace:
    """Reusable gather buffers: fresh multi-megabyte tensors every layer cost page faults on CPU."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1 << 16), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


DECODE_GROUP_ROWS = 16


@dataclass
class StaticDecode:
    """Decode rows described by tensors only (fixed shapes, nothing read on the host)."""

    block_table: torch.Tensor  # int32 [B, W]: every entry a valid page (unused ones: a scratch page)
    rows: torch.Tensor  # int32 [B]: 0..B-1, the block-table row of each token
    kv_lens: torch.Tensor  # int32 [B]: context length of each row, the new token included
    page_size: int

    @cached_property
    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the fixed-shape gather path, shared by all layers of the step: K rows, V rows (the
        table's full width per row) and the bool mask [B, 1, 1, L] (see :func:`_masked_slots`)."""
        return _masked_slots(self.block_table, self.kv_lens, self.page_size)


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward step, shared by all layers.

    Rows ``[0, num_decode)`` of the flat batch are decode tokens; the rest belong to ``extends``.
    """

    page_size: int
    slot_pages: torch.Tensor  # LongTensor [T]: page receiving each new token's K/V
    slot_offsets: torch.Tensor  # LongTensor [T]: offset inside that page
    k_slots: torch.Tensor  # LongTensor [T]: row of each new token's K in the layer viewed as [-1, Hkv, D]
    v_slots: torch.Tensor  # the same for V (one half-page further)
    num_decode: int
    decode_pages: list[list[int]]
    decode_kv_lens: list[int]
    extends: list[ExtendSpan]
    workspace: Workspace | None
    device: torch.device
    static: StaticDecode | None = None  # decode-only steps over static buffers: attend through these

    @classmethod
    def build(
        cls,
        page_size: int,
        decode_pages: list[list[int]],
        decode_kv_lens: list[int],
        extend_rows: list[tuple[int, int, list[int]]],
        device: torch.device,
        workspace: Workspace | None = None,
    ) -> AttentionMetadata:
        """Build metadata from plain lists.

        ``decode_pages[b]`` / ``decode_kv_lens[b]``: page list and context length (including the
        new token) of decode row ``b``. ``extend_rows``: ``(prefix_len, chunk_len, pages)`` per
        prefill chunk, in batch order after the decode rows. Decode rows are grouped
        ``DECODE_GROUP_ROWS`` at a time so callers that sort them by length pad little.
        """
        slot_pages: list[int] = []
        slot_offsets: list[int] = []
        for pages, kv_len in zip(decode_pages, decode_kv_lens, strict=True):
            pos = kv_len - 1
            slot_pages.append(pages[pos // page_size])
            slot_offsets.append(pos % page_size)
        num_decode = len(decode_pages)
        extends: list[ExtendSpan] = []
        start = num_decode
        for prefix_len, length, pages in extend_rows:
            for pos in range(prefix_len, prefix_len + length):
                slot_pages.append(pages[pos // page_size])
                slot_offsets.append(pos % page_size)
            used = (prefix_len + length + page_size - 1) // page_size
            extends.append(ExtendSpan(start, length, prefix_len, pages[:used], device))
            start += length
        slot_pages_t = torch.tensor(slot_pages, dtype=torch.long)
        slot_offsets_t = torch.tensor(slot_offsets, dtype=torch.long)
        k_slots = slot_pages_t * (2 * page_size) + slot_offsets_t
        return cls(
            page_size=page_size,
            slot_pages=slot_pages_t.to(device),
            slot_offsets=slot_offsets_t.to(device),
            k_slots=k_slots.to(device),
            v_slots=(k_slots + page_size).to(device),
            num_decode=num_decode,
            decode_pages=decode_pages,
            decode_kv_lens=decode_kv_lens,
            extends=extends,
            workspace=workspace or Workspace(),
            device=device,
        )

    @cached_property
    def native_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the native kernel, over the whole batch: int32 block table (one row per decode token,
        then one per prefill chunk), the row of each token and each token's causal context length."""
        tables = [*self.decode_pages, *(span.page_list for span in self.extends)]
        width = max(len(p) for p in tables)
        flat = [p for pages in tables for p in (*pages, *(0,) * (width - len(pages)))]
        rows = list(range(self.num_decode))
        lens = list(self.decode_kv_lens)
        for index, span in enumerate(self.extends, start=self.num_decode):
            rows.extend([index] * span.length)
            lens.extend(range(span.prefix_len + 1, span.prefix_len + span.length + 1))
        return (torch.tensor(flat, dtype=torch.int32).view(len(tables), width),
                torch.tensor(rows, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))

    @cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """Decode rows in padded groups of ``DECODE_GROUP_ROWS`` for the gather path (built on first use)."""
        page_size, decode_pages, decode_kv_lens = self.page_size, self.decode_pages, self.decode_kv_lens
        groups: list[DecodeGroup] = []
        for start in range(0, self.num_decode, DECODE_GROUP_ROWS):
            rows = range(start, min(start + DECODE_GROUP_ROWS, self.num_decode))
            width = max(len(decode_pages[r]) for r in rows)
            ids = [p for r in rows for p in decode_pages[r] + [0] * (width - len(decode_pages[r]))]
            table = torch.tensor(ids, dtype=torch.long).view(len(rows), width).to(self.device)
            lens = torch.tensor([decode_kv_lens[r] for r in rows]).to(self.device)
            k_slots, v_slots, visible = _masked_slots(table, lens, page_size)
            groups.append(DecodeGroup(start, len(rows), width, k_slots, v_slots, visible))
        return groups


def _masked_slots(table: torch.Tensor, kv_lens: torch.Tensor, page_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows to gather for every position of a padded block table ``[B, W]`` (K rows of the layer
    viewed as ``[-1, heads, dim]``, then V rows), and the bool mask ``[B, 1, 1, W * page_size]`` of
    positions below each row's length. Masked positions read the row's own position 0 (written
    before any attention) instead of whatever a reused page or the padding holds there. Tensors only,
    fixed shapes: runs inside a CUDA graph."""
    rows, width = table.shape
    length = width * page_size
    positions = torch.arange(length, device=table.device)
    pages = table.long()[:, :, None].expand(rows, width, page_size).reshape(rows, length)
    slots = pages * (2 * page_size) + positions % page_size
    visible = positions[None, :] < kv_lens[:, None]
    k_slots = torch.where(visible, slots, slots[:, :1]).flatten()
    return k_slots, k_slots + page_size, visible[:, None, None, :]


def _gather_slots(kv_layer: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``slots`` of the layer viewed as ``[num_pages * 2 * page_size, heads, dim]`` (page ``p``'s
    K, then its V), copied into ``out`` (or a new tensor): ``[len(slots), heads, dim]``."""
    _, _, page_size, heads, dim = kv_layer.shape
    if out is None:
        out = torch.empty(slots.numel(), heads, dim, dtype=kv_layer.dtype, device=kv_layer.device)
    if kv_layer.is_contiguous():
        torch.index_select(kv_layer.view(-1, heads * dim), 0, slots, out=out.view(slots.numel(), heads * dim))
    else:
        out.view(slots.numel(), heads, dim).copy_(
            kv_layer[slots // (2 * page_size), slots // page_size % 2, slots % page_size])
    return out.view(slots.numel(), heads, dim)


def _gather_into(kv_layer: torch.Tensor, pages: torch.Tensor, which: int, out: torch.Tensor) -> torch.Tensor:
    """K (which=0) or V (which=1) of ``pages`` copied into the flat buffer ``out``, viewed as
    ``[len(pages) * page_size, heads, dim]``."""
    num_pages, _, page_size, heads, dim = kv_layer.shape
    src = kv_layer[:, which].flatten(1)  # [num_pages, page_size*H*D], a view
    torch.index_select(src, 0, pages, out=out.view(pages.numel(), -1))
    return out.view(pages.numel() * page_size, heads, dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the pool, then attend. ``q``: [T, Hq, D]; ``k``/``v``: [T, Hkv, D]."""
    if kv_layer.is_contiguous():
        flat = kv_layer.view(-1, *kv_layer.shape[3:])  # K of page p: rows [2p, 2p + 1) * page_size, then V
        flat.index_copy_(0, meta.k_slots, k.to(kv_layer.dtype))
        flat.index_copy_(0, meta.v_slots, v.to(kv_layer.dtype))
    else:
        kv_layer[meta.slot_pages, 0, meta.slot_offsets] = k.to(kv_layer.dtype)
        kv_layer[meta.slot_pages, 1, meta.slot_offsets] = v.to(kv_layer.dtype)
    out = torch.empty_like(q)
    if meta.static is not None:
        return _static_decode(q, kv_layer, meta.static, scale, out)
    if native.supports(q, kv_layer):
        table, row_of_token, kv_len = meta.native_tables
        native.paged_attention(q.contiguous(), kv_layer, table, row_of_token, kv_len, scale, out)
        return out
    gqa = q.shape[1] != k.shape[1]
    for group in meta.decode_groups:
        _decode_group(q, kv_layer, group, meta.workspace, scale, out)
    for span in meta.extends:
        rows = slice(span.start, span.start + span.length)
        query = q[rows].transpose(0, 1)  # [Hq, L, D]
        if span.prefix_len == 0:
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            total = span.prefix_len + span.length
            _, _, page_size, heads, dim = kv_layer.shape
            numel = span.pages.numel() * page_size * heads * dim
            ws = meta.workspace
            keys = _gather_into(kv_layer, span.pages, 0, ws.take(0, numel, kv_layer.dtype, kv_layer.device))
            values = _gather_into(kv_layer, span.pages, 1, ws.take(1, numel, kv_layer.dtype, kv_layer.device))
            keys = keys[:total].transpose(0, 1).to(q.dtype)
            values = values[:total].transpose(0, 1).to(q.dtype)
            o = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=span.mask, scale=scale, enable_gqa=gqa
            )
        out[rows] = o.transpose(0, 1)
    return out


def _static_decode(q: torch.Tensor, kv_layer: torch.Tensor, static: StaticDecode, scale: float,
                   out: torch.Tensor) -> torch.Tensor:
    """One query token per block-table row. Native kernel where it runs; otherwise every row's full
    table width is gathered and masked past its length (fixed shapes, as a CUDA graph needs)."""
    if native.supports(q, kv_layer):
        native.paged_attention(q.contiguous(), kv_layer, static.block_table, static.rows, static.kv_lens, scale, out)
        return out
    rows = static.block_table.shape[0]
    _, _, _, heads, dim = kv_layer.shape
    k_slots, v_slots, visible = static.gather
    keys = _gather_slots(kv_layer, k_slots).view(rows, -1, heads, dim).transpose(1, 2).to(q.dtype)
    values = _gather_slots(kv_layer, v_slots).view(rows, -1, heads, dim).transpose(1, 2).to(q.dtype)
    query = q.view(rows, heads, q.shape[1] // heads, dim)  # [B, Hkv, q-per-kv, D]
    o = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale)
    out.copy_(o.reshape(rows, q.shape[1], dim))
    return out


def _decode_group(
    q: torch.Tensor, kv_layer: torch.Tensor, group: DecodeGroup, ws: Workspace, scale: float, out: torch.Tensor
) -> None:
    """One query token per row; query heads are grouped per KV head so K/V are never repeated."""
    _, _, _, heads, dim = kv_layer.shape
    numel = group.k_slots.numel() * heads * dim
    keys = _gather_slots(kv_layer, group.k_slots, ws.take(0, numel, kv_layer.dtype, kv_layer.device))
    values = _gather_slots(kv_layer, group.v_slots, ws.take(1, numel, kv_layer.dtype, kv_layer.device))
    g = group.size
    keys = keys.view(g, -1, heads, dim).transpose(1, 2).to(q.dtype)  # [g, Hkv, L, D]
    values = values.view(g, -1, heads, dim).transpose(1, 2).to(q.dtype)
    rows = slice(group.start, group.start + g)
    query = q[rows].view(g, heads, q.shape[1] // heads, dim)  # [g, Hkv, q-per-kv, D]
    o = F.scaled_dot_product_attention(query, keys, values, attn_mask=group.visible, scale=scale)
    out[rows] = o.reshape(g, q.shape[1], dim)
