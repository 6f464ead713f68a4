"""The server's prefix-cache event feed: ``GET /kv_events?after=SEQ&timeout=S`` (long poll).

Every DP rank's radix cache records what it stores and evicts (:mod:`pdserve.kv_events`:
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` with chained page hashes); the worker
ships them to the front after each step, and the front numbers them here, one batch per rank per
step, with a server-wide ``seq``. A scheduler polls with the last ``seq`` it saw: the answer holds
every later batch (each with its ``dp_rank``), or waits up to ``timeout`` seconds for one. The feed
keeps the latest :data:`MAX_BATCHES` batches; a poller that fell further behind gets
``"lost": true`` and should rebuild its view (e.g. treat the server's cache as unknown until new
stores arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from pdserve.kv_events import CacheEvent, EventBatch

MAX_BATCHES = 10_000
MAX_WAIT_S = 30.0


class KVEventFeed:
    """Numbered event batches of all ranks; lives on the front's event loop."""

    def __init__(self, max_batches: int = MAX_BATCHES) -> None:
        self.batches: deque[EventBatch] = deque(maxlen=max_batches)
        self.last_seq = 0
        self._changed = asyncio.Event()

    def publish(self, dp_rank: int, events: list[CacheEvent]) -> None:
        if not events:
            return
        self.last_seq += 1
        self.batches.append(EventBatch(self.last_seq, time.time(), dp_rank, events))
        self._changed.set()
        self._changed = asyncio.Event()

    def since(self, after: int) -> tuple[list[EventBatch], bool]:
        """Batches numbered above ``after``, and whether some of them were already dropped."""
        lost = bool(self.batches) and after < self.batches[0].seq - 1
        return [b for b in self.batches if b.seq > after], lost

    async def poll(self, after: int, timeout: float) -> tuple[list[EventBatch], bool]:
        """Like :meth:`since`, waiting up to ``timeout`` seconds for a first new batch."""
        if after >= self.last_seq and timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(timeout, MAX_WAIT_S))
        return self.since(after)
