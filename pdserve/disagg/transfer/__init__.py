"""KV transfer backends behind one interface (:mod:`.base`): ``tcp`` and ``shm``."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.config import ALL_BACKENDS, BACKENDS
from pdserve.disagg.transfer.base import (
    KVReceiver,
    KVSender,
    PeerLost,
    ReceiverEvent,
    ReceiverGuard,
    ReceiverLost,
    SendResult,
)
from pdserve.engine.kv_pool import KVPool

__all__ = ["BACKENDS", "KVReceiver", "KVSender", "PeerLost", "ReceiverEvent", "ReceiverGuard", "ReceiverLost", "SendResult",
           "create_receiver", "create_sender"]


def create_sender(
    backend: str, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
    auth: PlaneAuth | None = None, idle_timeout: float = 60.0,
) -> KVSender:
    _check_pool(backend, pool)
    if backend == "tcp":
        from pdserve.disagg.transfer.tcp import TcpSender

        return TcpSender(pool, on_done, io_timeout, auth, idle_timeout)
    if backend == "shm":
        from pdserve.disagg.transfer.shm import ShmSender

        return ShmSender(pool, on_done, io_timeout, auth, idle_timeout)
    if backend == "sim":
        from pdserve.sim.transfer import SimSender

        return SimSender(pool, on_done, io_timeout, auth, idle_timeout)
    raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")


def create_receiver(
    backend: str, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
    guard: ReceiverGuard | None = None,
) -> KVReceiver:
    """A receiver for ``pool`` (the ``shm`` backend moves the pool into shared memory first)."""
    _check_pool(backend, pool)
    if backend == "tcp":
        from pdserve.disagg.transfer.tcp import TcpReceiver

        return TcpReceiver(pool, on_event, host, io_timeout, guard)
    if backend == "shm":
        from pdserve.disagg.transfer.shm import ShmReceiver

        return ShmReceiver(pool, on_event, host, io_timeout, guard)
    if backend == "sim":
        from pdserve.sim.transfer import SimReceiver

        return SimReceiver(pool, on_event, host, io_timeout, guard)
    raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")


def _check_pool(backend: str, pool: KVPool) -> None:
    if pool.device.type != "cpu":
        raise ValueError(
            f"the {backend} transfer backend moves KV pages of a CPU pool; this pool is on {pool.device} "
            "(run P/D servers with --device cpu; a GPU backend such as NIXL is not implemented yet)"
        )
