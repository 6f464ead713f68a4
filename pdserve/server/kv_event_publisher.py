"""KV events over ZMQ in vLLM's wire format (``--kv-events-config``), next to ``GET /kv_events``.

One PUB socket per DP rank (vLLM's convention: the configured port plus the rank), each with its
own sequence numbers from 0, and optionally one ROUTER replay socket per rank (same offset). A
message is three frames: topic, 8-byte big-endian seq, msgpack ``[ts, events, data_parallel_rank]``
(:mod:`pdserve.vllm_kv_events`). A replay request is ``[b"", start_seq (8 bytes BE)]`` from a REQ
(or DEALER) socket; the answer is every buffered ``[seq, payload]`` from ``start_seq`` on, then
``[-1 (8 bytes), b""]``.

The radix cache names pages by pdserve's own chained hash; the front translates each rank's events
to vLLM's block hashes as they arrive (one SHA-256 per stored page; the map holds one entry per
cached page), so the translation never depends on what a queue dropped. Everything else happens
on one publisher thread: the event loop only appends to a bounded deque (full: the oldest batch
is dropped and counted, ``pdserve:kv_events_dropped``) and pokes the thread without blocking.
PUB sockets never block (a slow subscriber loses messages at its high-water mark); replays are
rate-limited and their sends never block (a peer that does not read loses them); malformed or
oversized replay requests are counted and ignored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

import zmq

from pdserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent
from pdserve.server.kv_events_config import KVEventsConfig, offset_endpoint, should_bind
from pdserve.vllm_kv_events import BlockHasher, WireFormat

logger = logging.getLogger("pdserve.server.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAYS_PER_S = 50.0  # replay requests served per second and rank (a token bucket; the rest is dropped)
REPLAY_BURST = 20.0
MAX_REPLAY_REQUEST_BYTES = 64  # a replay request is 8 bytes; bigger frames make ZMQ drop the peer


class _RankChannel:
    """One rank's sockets, numbering and replay buffer; touched only by the publisher thread."""

    def __init__(self, ctx: zmq.Context, config: KVEventsConfig, rank: int) -> None:
        self.rank = rank
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, config.hwm)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = offset_endpoint(config.endpoint, rank)
        if should_bind(self.endpoint, config.bind):
            self.pub.bind(self.endpoint)
        else:
            self.pub.connect(self.endpoint)
        self.replay: zmq.Socket | None = None
        self.replay_endpoint: str | None = None
        self.tokens = REPLAY_BURST
        self.refill_at = time.monotonic()
        if config.replay_endpoint is not None:
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            self.replay.setsockopt(zmq.MAXMSGSIZE, MAX_REPLAY_REQUEST_BYTES)
            self.replay.setsockopt(zmq.SNDHWM, config.buffer_steps + 1)
            self.replay.setsockopt(zmq.RCVHWM, 1000)
            self.replay_endpoint = offset_endpoint(config.replay_endpoint, rank)
            self.replay.bind(self.replay_endpoint)

    def close(self) -> None:
        self.pub.close(0)
        if self.replay is not None:
            self.replay.close(0)


class ZmqKVEventPublisher:
    """The server's vLLM-format event publisher: :meth:`publish` (event loop) never blocks."""

    def __init__(self, config: KVEventsConfig, dp_size: int, topic: str, hash_algo: str = "sha256",
                 page_size: int = 16) -> None:
        self.config = config
        self.dp_size = dp_size
        self.topic = topic
        self.hasher = BlockHasher(hash_algo)
        self.wire = WireFormat(config.encoding)
        self.page_size = page_size
        self.digests: list[dict[int, bytes]] = [{} for _ in range(dp_size)]  # pdserve hash -> vLLM digest
        self.queue: deque[tuple[int, float, list[Any]]] = deque(maxlen=config.max_queue_size)
        self.num_queued = 0
        self.num_dropped = 0  # batches dropped oldest-first because the thread fell behind
        self.num_published = [0] * dp_size
        self.num_unmapped = 0  # events naming a page the translation never saw (not sent)
        self.replays_served = 0
        self.replays_refused: dict[str, int] = {"malformed": 0, "rate_limited": 0}
        self._ctx = zmq.Context(1)
        self._wake_addr = f"inproc://pdserve-kv-events-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.setsockopt(zmq.LINGER, 0)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.setsockopt(zmq.SNDHWM, 1)
        self._wake_tx.connect(self._wake_addr)
        self._running = True
        try:
            self.channels = [_RankChannel(self._ctx, config, rank) for rank in range(dp_size)]
        except zmq.ZMQError as exc:
            self._close_sockets([])
            raise RuntimeError(f"kv-events-config: cannot open the ZMQ event sockets "
                               f"({config.endpoint}, replay {config.replay_endpoint}): {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-events", daemon=True)
        self._thread.start()
        for ch in self.channels:
            logger.info("dp rank %d: KV events (%s encoding, %s hashes) on %s%s, topic %r", ch.rank,
                        config.encoding, hash_algo, ch.endpoint,
                        f", replay on {ch.replay_endpoint}" if ch.replay_endpoint else "", topic)

    # ------------------------------------------------------------------ event loop side
    def publish(self, dp_rank: int, events: list[CacheEvent]) -> None:
        """Translate one rank's events to vLLM's and queue them for the thread (never blocks)."""
        if not events or not self._running:
            return
        out = self._translate(dp_rank, events)
        if not out:
            return
        if len(self.queue) == self.queue.maxlen:
            self.num_dropped += 1
        self.queue.append((dp_rank, time.time(), out))
        self.num_queued += 1
        with contextlib.suppress(zmq.ZMQError):
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def rank_reset(self, dp_rank: int) -> None:
        """A rank's worker restarted with an empty cache: tell subscribers, forget its pages."""
        self.publish(dp_rank, [AllBlocksCleared()])

    def _translate(self, rank: int, events: list[CacheEvent]) -> list[Any]:
        digests, hasher, wire = self.digests[rank], self.hasher, self.wire
        out: list[Any] = []
        for event in events:
            if isinstance(event, BlockStored):
                parent = None
                if event.parent_block_hash is not None:
                    parent = digests.get(event.parent_block_hash)
                    if parent is None:
                        self.num_unmapped += 1
                        continue
                size = event.block_size
                ext, parent_ext = [], None if parent is None else hasher.external(parent)
                for i, own in enumerate(event.block_hashes):
                    parent = hasher.digest(parent, event.token_ids[i * size : (i + 1) * size])
                    digests[own] = parent
                    ext.append(hasher.external(parent))
                out.append(wire.stored(ext, parent_ext, list(event.token_ids), size))
            elif isinstance(event, BlockRemoved):
                gone = [digests.pop(h, None) for h in event.block_hashes]
                known = [hasher.external(d) for d in gone if d is not None]
                self.num_unmapped += len(gone) - len(known)
                if known:
                    out.append(wire.removed(known))
            elif isinstance(event, AllBlocksCleared):
                digests.clear()
                out.append(wire.cleared())
        return out

    # ------------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        replays = {ch.replay: ch for ch in self.channels if ch.replay is not None}
        for sock in replays:
            poller.register(sock, zmq.POLLIN)
        while self._running:
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            if self._wake_rx in ready:
                with contextlib.suppress(zmq.ZMQError):
                    while self._wake_rx.recv(zmq.NOBLOCK) is not None:
                        pass
            self._drain()
            for sock, ch in replays.items():
                if sock in ready:
                    self._serve_replays(ch)
        self._drain()  # what was queued before close
        self._close_sockets(self.channels)

    def _drain(self) -> None:
        while self.queue:
            try:
                rank, ts, events = self.queue.popleft()
            except IndexError:
                return
            ch = self.channels[rank]
            try:
                payload = self.wire.encode(ts, events, rank)
            except Exception:  # a bug, not input: keep publishing the rest
                logger.exception("dp rank %d: cannot encode a KV event batch", rank)
                continue
            seq = ch.seq
            ch.seq += 1
            ch.buffer.append((seq, payload))
            with contextlib.suppress(zmq.ZMQError):  # PUB never blocks; nothing to retry
                ch.pub.send_multipart((self.topic.encode(), seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            self.num_published[rank] += 1

    def _serve_replays(self, ch: _RankChannel) -> None:
        assert ch.replay is not None
        for _ in range(32):  # a bounded number per round: the queue is never starved by replays
            try:
                frames = ch.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            now = time.monotonic()
            ch.tokens = min(REPLAY_BURST, ch.tokens + (now - ch.refill_at) * REPLAYS_PER_S)
            ch.refill_at = now
            if len(frames) == 3 and frames[1] == b"" and len(frames[2]) == 8:
                identity, start = frames[0], int.from_bytes(frames[2], "big")
            elif len(frames) == 2 and len(frames[1]) == 8:  # a DEALER without the empty delimiter
                identity, start = frames[0], int.from_bytes(frames[1], "big")
            else:
                self.replays_refused["malformed"] += 1
                continue
            if ch.tokens < 1:
                self.replays_refused["rate_limited"] += 1
                continue
            ch.tokens -= 1
            self.replays_served += 1
            try:
                for seq, payload in list(ch.buffer):
                    if seq >= start:
                        ch.replay.send_multipart((identity, b"", seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
                ch.replay.send_multipart((identity, b"", END_SEQ, b""), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer is gone or does not read: ROUTER drops, nothing blocks

    def _close_sockets(self, channels: list[_RankChannel]) -> None:
        for ch in channels:
            ch.close()
        self._wake_rx.close(0)
        self._wake_tx.close(0)
        self._ctx.term()

    def close(self) -> None:
        """Stop the thread (it publishes what is queued first) and free the sockets."""
        if not self._running:
            return
        self._running = False
        self._thread.join(timeout=5.0)

    def counters(self) -> dict[str, Any]:
        return {"queued": self.num_queued, "dropped": self.num_dropped, "published": list(self.num_published),
                "unmapped": self.num_unmapped, "replays_served": self.replays_served,
                "replays_refused": dict(self.replays_refused), "queue_depth": len(self.queue)}
