"""Page hashes of token ids and the prefix-cache events built on them (torch-free, shared by the
engine, the server and the router, which must not import the engine).

A page's hash chains over the whole prefix, as vLLM's block hashes do: ``hash(page i)`` digests
``hash(page i-1)`` and the page's token ids, so one hash names one exact prefix. The engine's
radix cache publishes :class:`BlockStored` / :class:`BlockRemoved` / :class:`AllBlocksCleared`
(the names of vLLM's KV events) with these hashes; the router computes the same hashes from its
own tokenization to find which (server, DP rank) holds a prompt's prefix; P/D decode and prefill
compare them before trusting that decode already holds a prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import msgspec

ROOT_HASH = 0


def page_hash(parent: int, tokens: Sequence[int]) -> int:
    """Hash of one full page of ``tokens`` following the prefix whose last page hashed to ``parent``."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + array("q", tokens).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits a signed int64 everywhere


def page_hashes(token_ids: Sequence[int], page_size: int, max_pages: int | None = None) -> list[int]:
    """Chained hashes of the full pages of ``token_ids`` (a trailing partial page has none)."""
    count = len(token_ids) // page_size
    if max_pages is not None:
        count = min(count, max_pages)
    hashes: list[int] = []
    parent = ROOT_HASH
    for i in range(count):
        parent = page_hash(parent, token_ids[i * page_size : (i + 1) * page_size])
        hashes.append(parent)
    return hashes


class BlockStored(msgspec.Struct, tag="BlockStored", frozen=True):
    """Pages entered the cache: ``block_hashes`` in prefix order, following ``parent_block_hash``."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", frozen=True):
    """Pages left the cache (evicted)."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", frozen=True):
    """The cache was flushed."""


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, frozen=True):
    """Events of one DP rank, numbered: ``seq`` is the number of the batch on that rank."""

    seq: int
    ts: float
    dp_rank: int
    events: list[CacheEvent]
