"""What the router believes each unit (server, DP rank) holds in its prefix cache.

Each unit has a set of page hashes, least recently used first. Two sources fill it:

* **predictions**: a cache-based policy that sends a prompt to a unit records the prompt's page
  hashes there at once, so the next request with the same prefix finds it even before the server
  has computed a single page (SGLang's router works this way, with nothing else);
* **events**: the servers' ``GET /kv_events`` feeds (:mod:`pdserve.router.kv_event_watch`) say
  which pages each rank really stored, evicted or flushed. A page the feed stored is *confirmed*;
  a page it removed is dropped whatever predicted it. While a worker's feed is live, a prediction
  not confirmed within :data:`PREDICTION_TTL_S` expires (the request failed, or the server does
  not cache), so the index converges to the servers' real contents.

Prompts given as token ids (or tokenized by :mod:`pdserve.router.prompt_tokens`) are hashed per KV
page of the unit's server (``page_size`` from its ``/server_info``) with the engine's own chained
page hashes (:func:`pdserve.kv_events.page_hashes`), so a match means whole cached pages. A text
prompt the router could not tokenize falls back to chained hashes of ``block_chars``-character
blocks: still a prefix affinity, but events can never confirm those.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pdserve.kv_events import page_hashes
from pdserve.router.request_info import CHARS_PER_TOKEN, RequestInfo
from pdserve.router.worker import Unit

PREDICTION_TTL_S = 30.0
CONFIRMED = 0.0  # the expiry stored for a page an event confirmed: never expires


class UnitCache:
    """The page hashes one unit is believed to hold: hash -> expiry (``CONFIRMED``, or the monotonic
    time a prediction lapses), least recently used first, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pages: OrderedDict[int, float] = OrderedDict()

    def match(self, hashes: Sequence[int], now: float) -> int:
        """How many leading pages of ``hashes`` this unit holds (expired predictions dropped)."""
        n = 0
        pages = self.pages
        for h in hashes:
            expiry = pages.get(h)
            if expiry is None:
                break
            if expiry != CONFIRMED and expiry < now:
                del pages[h]
                break
            n += 1
        return n

    def predict(self, hashes: Sequence[int], expiry: float) -> None:
        """Record ``hashes`` as sent here (confirmed pages stay confirmed), most recent last."""
        pages = self.pages
        for h in hashes:
            old = pages.pop(h, None)
            pages[h] = CONFIRMED if old == CONFIRMED else expiry
        self._trim()

    def confirm(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.pages.pop(h, None)
            self.pages[h] = CONFIRMED
        self._trim()

    def remove(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.pages.pop(h, None)

    def clear(self) -> None:
        self.pages.clear()

    def _trim(self) -> None:
        while len(self.pages) > self.capacity:
            self.pages.popitem(last=False)

    def __len__(self) -> int:
        return len(self.pages)


def block_hashes(key: str | tuple[int, ...], block_chars: int) -> tuple[list[int], int]:
    """Chained hashes of the full leading blocks of ``key`` (text: ``block_chars`` characters; ids:
    ``block_chars / 4`` tokens), and the block length used."""
    block = block_chars if isinstance(key, str) else max(1, block_chars // CHARS_PER_TOKEN)
    hashes = []
    h = 0
    for start in range(0, len(key) - block + 1, block):
        h = hash((h, key[start:start + block]))
        hashes.append(h)
    return hashes, block


def page_size_of(unit: Unit) -> int | None:
    size = unit.worker.info.get("page_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class CacheIndex:
    """Every unit's :class:`UnitCache`, shared by the policies of both sides and the event watcher."""

    def __init__(self, max_pages: int = 1 << 20, block_chars: int = 16) -> None:
        self.max_pages = max_pages
        self.block_chars = block_chars
        self.units: dict[Unit, UnitCache] = {}
        self.live_feeds: set[Any] = set()  # workers whose /kv_events feed is being followed

    def cache(self, unit: Unit) -> UnitCache:
        cache = self.units.get(unit)
        if cache is None:
            cache = self.units[unit] = UnitCache(self.max_pages)
        return cache

    def prompt_hashes(self, unit: Unit, info: RequestInfo) -> tuple[list[int], int]:
        """The prompt's hashes as ``unit`` caches it, and how many prompt items (tokens or
        characters) one hash covers."""
        ids = info.token_ids_for(unit.worker.info.get("model_path"))
        size = page_size_of(unit)
        if ids is not None and size is not None:
            return page_hashes(ids, size), size
        return block_hashes(info.key, self.block_chars)

    def match(self, unit: Unit, hashes: Sequence[int]) -> int:
        cache = self.units.get(unit)
        return cache.match(hashes, time.monotonic()) if cache is not None and hashes else 0

    def predict(self, unit: Unit, hashes: Sequence[int]) -> None:
        if hashes:
            ttl = PREDICTION_TTL_S if unit.worker in self.live_feeds else float("inf")
            self.cache(unit).predict(hashes, time.monotonic() + ttl)

    def forget(self, unit: Unit) -> None:
        self.units.pop(unit, None)

    def pages_of(self, unit: Unit) -> int:
        cache = self.units.get(unit)
        return len(cache) if cache is not None else 0


class PromptMatcher:
    """Per request: the prompt's hashes per page size (computed once) and each unit's match length
    in prompt items."""

    def __init__(self, index: CacheIndex, info: RequestInfo) -> None:
        self.index = index
        self.info = info
        self._hashes: dict[tuple[Any, Any], tuple[list[int], int]] = {}

    def hashes(self, unit: Unit) -> tuple[list[int], int]:
        key = (page_size_of(unit), unit.worker.info.get("model_path"))
        if key not in self._hashes:
            self._hashes[key] = self.index.prompt_hashes(unit, self.info)
        return self._hashes[key]

    def matched_items(self, unit: Unit) -> int:
        hashes, per_hash = self.hashes(unit)
        return self.index.match(unit, hashes) * per_hash

    def record(self, unit: Unit) -> None:
        self.index.predict(unit, self.hashes(unit)[0])
