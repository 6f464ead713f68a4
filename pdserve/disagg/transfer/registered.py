"""What the transfer-engine backends (``nixl``, ``mooncake``) share: page descriptors from the block
tables, the checks on a decode pool's published registration, and the ordered stream around the writes.

Both engines write straight into memory the other process registered with them, so the data path
needs no staging and works on host or GPU memory alike (the memory type follows the pool's device).
Everything else travels on the authenticated stream of :mod:`.stream`, exactly as for ``shm``: the
handshake under the deployment's secret, ``Accepted``/``Aux``/``Status`` in order, the ``Pages``
notification sent only after the engine reported the write complete, the sender's liveness thread on
each connection (a dead decode is noticed within the keepalive bound), the receiver's room checks
(pages outside the room refused) and its ``PeerLost`` for a stream that ends mid-room.

Push, not pull: prefill WRITEs into decode's pages (SGLang's NIXL and Mooncake flows), where vLLM's
NIXL connector has decode READ from prefill. Pushing fits this interface and the engine loop: prefill
ships each chunk's complete pages while the next chunk computes (``on_prefill_progress``), and it knows
locally when a write has completed, so it frees its source pages at once, without the pull design's
extra "done reading" notification from decode and the prefill-side timeout that guards against a
decode that never sends it. The cost is that an authenticated prefill can write anywhere in decode's
registered pool (as with ``shm``): decode reports only frames whose pages belong to the room, and keeps
an aborted room's pages quarantined until prefill's final ``Status`` (``close_stops_writes`` is False).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.stream import paired_runs
from pdserve.engine.kv_pool import KVPool

POLL_FIRST_S = 20e-6  # completion polling starts this fine and backs off (the first checks usually succeed)
POLL_MAX_S = 2e-3


def memory_type(pool: KVPool) -> tuple[str, int]:
    """``("DRAM", 0)`` for a host pool, ``("VRAM", device index)`` for a CUDA pool: one code path."""
    if pool.device.type == "cuda":
        return "VRAM", pool.device.index if pool.device.index is not None else torch.cuda.current_device()
    if pool.device.type != "cpu":
        raise ValueError(f"a KV pool on {pool.device} cannot be registered with a transfer engine (cpu or cuda)")
    return "DRAM", 0


def layer_regions(pool: KVPool) -> list[tuple[int, int]]:
    """``(address, bytes)`` of every layer of ``pool``: what is registered, once per rank."""
    if not pool.layers:
        raise ValueError("a transfer engine needs a KV pool with storage")
    regions = []
    for layer in pool.layers:
        if not layer.is_contiguous():
            raise ValueError("a KV layer must be contiguous to be registered")
        regions.append((layer.data_ptr(), layer.numel() * layer.element_size()))
    return regions


def registration(pool: KVPool, peer: str, metadata: bytes = b"") -> m.RegisteredPool:
    """The registration a decode receiver publishes in its :class:`ReceiverInfo`."""
    mem, device = memory_type(pool)
    return m.RegisteredPool(peer, [addr for addr, _ in layer_regions(pool)], pool.num_pages * pool.page_bytes(),
                            mem, device, metadata)


@dataclass
class Spans:
    """One job's writes: per (layer, run of pages consecutive on both sides), the source address, the
    destination address and the length; runs are merged so a contiguous block table costs one descriptor
    per layer."""

    src: list[int]
    dst: list[int]
    lengths: list[int]

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)


def check_registration(info: m.ReceiverInfo, pool: KVPool) -> m.RegisteredPool:
    """The decode pool's registration, after checking it describes a pool of our layout; a lying or
    mismatched peer is refused here (the engine also refuses addresses outside the registered memory)."""
    reg = info.registered
    if reg is None:
        raise ConnectionError(f"decode receiver {info.address} published no {info.backend} registration")
    expected = info.num_pages * pool.page_bytes()
    if len(reg.layer_addrs) != len(pool.layers) or reg.layer_bytes != expected:
        raise ConnectionError(f"decode receiver {info.address} registered {len(reg.layer_addrs)} layers of "
                              f"{reg.layer_bytes} bytes; {len(pool.layers)} layers of {expected} expected")
    if any(not 0 < addr < 1 << 64 for addr in reg.layer_addrs):
        raise ConnectionError(f"decode receiver {info.address} published an impossible layer address")
    return reg


def page_spans(pool: KVPool, reg: m.RegisteredPool, num_pages: int, src_pages: list[int],
               dst_pages: list[int]) -> Spans:
    """The job's descriptors from the two block tables (every destination page inside the decode pool)."""
    if any(not 0 <= p < num_pages for p in dst_pages):
        raise ConnectionError(f"destination page outside the decode pool [0, {num_pages})")
    if any(not 0 <= p < pool.num_pages for p in src_pages):
        raise ValueError(f"source page outside the pool [0, {pool.num_pages})")
    page_bytes = pool.page_bytes()
    runs = paired_runs(src_pages, dst_pages)
    spans = Spans([], [], [])
    for (src_base, _), dst_base in zip(layer_regions(pool), reg.layer_addrs):
        for s, d, count in runs:
            spans.src.append(src_base + s * page_bytes)
            spans.dst.append(dst_base + d * page_bytes)
            spans.lengths.append(count * page_bytes)
    return spans


class Backoff:
    """Sleeps between completion polls: fine at first, then up to :data:`POLL_MAX_S`, until a deadline."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay = POLL_FIRST_S

    def wait(self) -> bool:
        """Sleep a little; False once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, POLL_MAX_S)
        return True
