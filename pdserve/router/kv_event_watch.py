"""Following each server's prefix-cache events (``GET /kv_events`` long poll) into the router's
:class:`~pdserve.router.prefix_index.CacheIndex`.

One task per healthy worker polls ``/kv_events?after=SEQ&timeout=POLL_S``; each batch names its DP
rank: ``BlockStored`` confirms pages on that unit, ``BlockRemoved`` drops them, ``AllBlocksCleared``
empties it. A feed that reports ``lost`` (the router fell behind) or a ``last_seq`` below the one
already seen (the server restarted) empties the worker's units: its cache is unknown until new
events come. A worker without the endpoint (404: not a pdserve server) is not polled again; other
errors are retried after :data:`RETRY_S`. Every poll is bounded by the long-poll timeout plus the
health-check timeout, and its answer by :data:`MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp

from pdserve.router.prefix_index import CacheIndex
from pdserve.router.worker import Worker

logger = logging.getLogger("pdserve.router")

POLL_S = 10.0
RETRY_S = 2.0
MAX_ANSWER_BYTES = 64 << 20  # a larger answer is not read: the server's units are reset instead
SKIP_AFTER = 2**63 - 1  # asks only for the feed's last_seq


def apply_batches(index: CacheIndex, worker: Worker, batches: Any) -> int:
    """Apply one ``/kv_events`` answer's batches to ``worker``'s units; the number of events applied
    (malformed entries are skipped)."""
    applied = 0
    if not isinstance(batches, list):
        return 0
    for batch in batches:
        if not isinstance(batch, dict):
            continue
        rank = batch.get("dp_rank")
        events = batch.get("events")
        if not isinstance(rank, int) or not 0 <= rank < len(worker.units) or not isinstance(events, list):
            continue
        cache = index.cache(worker.units[rank])
        for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            hashes = event.get("block_hashes")
            hashes = [h for h in hashes if isinstance(h, int)] if isinstance(hashes, list) else []
            if kind == "BlockStored":
                cache.confirm(hashes)
            elif kind == "BlockRemoved":
                cache.remove(hashes)
            elif kind == "AllBlocksCleared":
                cache.clear()
            else:
                continue
            applied += 1
    return applied


class KVEventWatcher:
    """Polls the ``/kv_events`` feed of every healthy worker while the router runs."""

    def __init__(self, index: CacheIndex, headers: dict[str, str], request_timeout_s: float) -> None:
        self.index = index
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(total=POLL_S + request_timeout_s)
        self.tasks: dict[Worker, asyncio.Task] = {}
        self.unsupported: set[Worker] = set()

    def sync(self, session: aiohttp.ClientSession, workers: list[Worker]) -> None:
        """Follow every healthy worker not followed yet; stop following the others."""
        healthy = {w for w in workers if w.healthy and w not in self.unsupported}
        for worker in list(self.tasks):
            if worker not in healthy:
                self.tasks.pop(worker).cancel()
                self.index.live_feeds.discard(worker)
        for worker in healthy:
            if worker not in self.tasks or self.tasks[worker].done():
                self.tasks[worker] = asyncio.create_task(self._follow(session, worker),
                                                         name=f"router-kv-events-{worker.url}")

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    def _reset(self, worker: Worker) -> None:
        for unit in worker.units:
            self.index.cache(unit).clear()

    async def _follow(self, session: aiohttp.ClientSession, worker: Worker) -> None:
        after = 0
        skip = False  # the last answer was too large: skip to the feed's end (cache state unknown)
        url = worker.url + "/kv_events"
        while True:
            params = {"after": str(SKIP_AFTER), "timeout": "0"} if skip else {"after": str(after),
                                                                               "timeout": str(POLL_S)}
            try:
                async with session.get(url, params=params, headers=self.headers, timeout=self.timeout) as resp:
                    if resp.status == 404:
                        logger.info("%s has no /kv_events feed: its cache is tracked by predictions only",
                                    worker.url)
                        self.unsupported.add(worker)
                        self.index.live_feeds.discard(worker)
                        return
                    resp.raise_for_status()
                    raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    logger.warning("GET /kv_events of %s answered over %d bytes: its cache is reset in the "
                                   "router's view", worker.url, MAX_ANSWER_BYTES)
                    self._reset(worker)
                    skip = True
                    continue
                body = json.loads(raw)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                logger.debug("GET /kv_events of %s failed: %r", worker.url, e)
                self.index.live_feeds.discard(worker)  # the feed keeps its batches: the next poll catches up
                await asyncio.sleep(RETRY_S)
                continue
            last = body.get("last_seq") if isinstance(body, dict) else None
            if not isinstance(last, int) or last < 0:
                await asyncio.sleep(RETRY_S)
                continue
            self.index.live_feeds.add(worker)
            if skip:
                skip, after = False, last
                continue
            if body.get("lost") is True or last < after:
                self._reset(worker)
                if last < after:  # the server restarted: its numbering began again
                    after = 0
                    continue
            apply_batches(self.index, worker, body.get("batches"))
            after = last
