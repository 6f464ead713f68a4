"""``mooncake`` backend: prefill writes pages into decode's registered pool with the Mooncake transfer
engine (SGLang's Mooncake flow).

Each rank starts one ``TransferEngine`` (``initialize(host, "P2PHANDSHAKE", protocol, device)``: no
metadata server; the protocol is ``--disaggregation-mooncake-protocol``, ``tcp`` here and ``rdma`` where
an RDMA device exists, with ``--disaggregation-ib-device``) and registers its pool's layers once. The
decode rank publishes its session (``host:rpc_port``) and its layers' addresses in its
``ReceiverInfo``, inside the KV request sealed with the deployment's secret; prefill resolves the session
from there (the engine's P2P handshake then fetches the segment) and moves each page job with one
``batch_transfer_sync_write`` of the runs from the two block tables, then sends the ``Pages`` frame on
the authenticated stream. The engine's target side refuses a write outside the memory decode
registered (a lying ``ReceiverInfo`` fails the room, named). The write returns once the target has
acknowledged the bytes, so the frame follows the data. Why push: see :mod:`.registered`.

Mooncake's own ports (the handshake RPC and its TCP data port) are not authenticated by the plane's
secret: a process that learns them can write into the registered decode pool (bounded to it). Use it
on a network you trust, as with any RDMA fabric.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pdserve.disagg import messages as m
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.transfer.base import ReceiverEvent, ReceiverGuard, SendResult
from pdserve.disagg.transfer.registered import check_registration, layer_regions, page_spans, registration
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    send_buffers,
)
from pdserve.engine.kv_pool import KVPool

logger = logging.getLogger("pdserve.disagg.transfer")


def start_engine(host: str, protocol: str, device: str, pool: KVPool):
    """A Mooncake engine on ``host`` with ``pool``'s layers registered, once."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # the engine's INFO/WARNING lines go to stderr otherwise
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device)
    if rc != 0:
        raise RuntimeError(f"the Mooncake transfer engine failed to start on {host} with protocol {protocol} "
                           f"(device {device or 'auto'}): rc {rc}")
    regions = layer_regions(pool)
    rc = engine.batch_register_memory([a for a, _ in regions], [n for _, n in regions])
    if rc != 0:
        raise RuntimeError(f"the Mooncake transfer engine could not register the {pool.device} KV pool: rc {rc}")
    return engine


def stop_engine(engine, pool: KVPool) -> None:
    """Unregister the pool's layers (the engine object itself lives until it is collected)."""
    for addr, _ in layer_regions(pool):
        rc = engine.unregister_memory(addr)
        if rc != 0:
            logger.warning("mooncake: unregistering a KV layer at %#x failed (rc %d)", addr, rc)


class MooncakeSender(StreamSender):
    backend = "mooncake"

    def __init__(self, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
                 auth: PlaneAuth | None = None, idle_timeout: float = 60.0, protocol: str = "tcp", device: str = "",
                 local_host: str = "127.0.0.1") -> None:
        self.protocol = protocol
        self.engine = start_engine(local_host, protocol, device, pool)
        super().__init__(pool, on_done, io_timeout, auth, idle_timeout)
        logger.info("mooncake KV transfer (%s): registered %d layers", protocol, len(pool.layers))

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        reg = check_registration(dest.info, self.pool)
        host, _, port = reg.peer.rpartition(":")
        if host != dest.info.host or not port.isdigit():
            raise ConnectionError(f"decode receiver {dest.info.address} published Mooncake session {reg.peer!r}, "
                                  f"not one on its own host {dest.info.host}; refused")
        spans = page_spans(self.pool, reg, dest.info.num_pages, job.src_pages, job.dst_pages)
        rc = self.engine.batch_transfer_sync_write(reg.peer, spans.src, spans.dst, spans.lengths)
        if rc != 0:
            raise ConnectionError(f"Mooncake write of room {job.room} to session {reg.peer} failed (rc {rc}: the "
                                  "decode engine is gone, or refused addresses outside its registered memory)")
        send_buffers(dest.connect(), frame(m.Pages(job.room, job.dst_pages, 0)))
        return spans.nbytes

    def close(self) -> None:
        super().close()
        stop_engine(self.engine, self.pool)


class MooncakeReceiver(StreamReceiver):
    backend = "mooncake"
    close_stops_writes = False  # the prefill engine writes into our memory on its own

    def __init__(self, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
                 guard: ReceiverGuard | None = None, protocol: str = "tcp", device: str = "",
                 local_host: str = "") -> None:
        self.engine = start_engine(host, protocol, device, pool)
        self.registration = registration(pool, f"{host}:{self.engine.get_rpc_port()}")
        super().__init__(pool, on_event, host, io_timeout, guard)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("mooncake", self.host, self.port, self.pool.num_pages, registered=self.registration)

    def read_pages(self, sock, msg: m.Pages) -> str | None:
        if msg.nbytes:
            raise ConnectionError(f"room {msg.room}: mooncake stream frames carry no payload, got {msg.nbytes} bytes")
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is not None:
            self.end_write(slot)
        return error

    def close(self) -> None:
        super().close()
        stop_engine(self.engine, self.pool)  # no writer reaches the pool's memory through the engine any more
