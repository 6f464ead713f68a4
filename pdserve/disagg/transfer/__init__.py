"""KV transfer backends behind one interface (:mod:`.base`): ``tcp`` and ``shm``.

``tcp`` moves pages of any pool (a GPU pool's through host staging, :mod:`.staging`); ``shm`` maps
host memory and needs a CPU pool on both sides."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.config import ALL_BACKENDS, BACKENDS, shm_device_error
from pdserve.disagg.transfer.base import (
    KVReceiver,
    KVSender,
    PeerLost,
    ReceiverEvent,
    ReceiverGuard,
    ReceiverLost,
    SendResult,
)
from pdserve.disagg.transfer.staging import DEFAULT_STAGING_BYTES
from pdserve.engine.kv_pool import KVPool

__all__ = ["BACKENDS", "DevicePoolError", "KVReceiver", "KVSender", "PeerLost", "ReceiverEvent", "ReceiverGuard",
           "ReceiverLost", "SendResult", "create_receiver", "create_sender", "shm_device_error"]


def create_sender(
    backend: str, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
    auth: PlaneAuth | None = None, idle_timeout: float = 60.0, staging: bool | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
) -> KVSender:
    """A sender for ``pool``; ``staging`` (tcp only) forces host staging on or off (None: when the
    pool is not host memory)."""
    _check_pool(backend, pool, staging)
    if backend == "tcp":
        from pdserve.disagg.transfer.tcp import TcpSender

        return TcpSender(pool, on_done, io_timeout, auth, idle_timeout, staging, staging_bytes)
    if backend == "shm":
        from pdserve.disagg.transfer.shm import ShmSender

        return ShmSender(pool, on_done, io_timeout, auth, idle_timeout)
    if backend == "sim":
        from pdserve.sim.transfer import SimSender

        return SimSender(pool, on_done, io_timeout, auth, idle_timeout)
    raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")


def create_receiver(
    backend: str, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
    guard: ReceiverGuard | None = None, staging: bool | None = None, staging_bytes: int = DEFAULT_STAGING_BYTES,
) -> KVReceiver:
    """A receiver for ``pool`` (the ``shm`` backend moves the pool into shared memory first);
    ``staging`` as for :func:`create_sender`."""
    _check_pool(backend, pool, staging)
    if backend == "tcp":
        from pdserve.disagg.transfer.tcp import TcpReceiver

        return TcpReceiver(pool, on_event, host, io_timeout, guard, staging, staging_bytes)
    if backend == "shm":
        from pdserve.disagg.transfer.shm import ShmReceiver

        return ShmReceiver(pool, on_event, host, io_timeout, guard)
    if backend == "sim":
        from pdserve.sim.transfer import SimReceiver

        return SimReceiver(pool, on_event, host, io_timeout, guard)
    raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")


class DevicePoolError(ValueError):
    """The chosen transfer backend cannot move pages of a pool on this device."""


def _check_pool(backend: str, pool: KVPool, staging: bool | None) -> None:
    if staging and backend != "tcp":
        raise ValueError(f"host staging is a tcp backend option; the {backend} backend has none")
    if backend == "shm" and pool.device.type != "cpu":
        raise DevicePoolError(shm_device_error(str(pool.device)))

