"""KV transfer backends behind one interface (:mod:`.base`), found by name in one registry.

``tcp`` moves pages of any pool (a GPU pool's through host staging, :mod:`.staging`); ``shm`` maps
host memory and needs a CPU pool on both sides; ``nixl`` and ``mooncake`` write pages with a transfer
engine from PyPI (an optional extra each) into the decode pool they registered, host or GPU memory.
Adding a backend is one module with a sender and a receiver class, and one :class:`Backend` entry."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.config import ALL_BACKENDS, BACKENDS, ENGINE_LIBRARIES, library_error, shm_device_error
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

__all__ = ["BACKENDS", "REGISTRY", "Backend", "BackendUnavailable", "DevicePoolError", "KVReceiver", "KVSender",
           "PeerLost", "ReceiverEvent", "ReceiverGuard", "ReceiverLost", "SendResult", "create_receiver",
           "create_sender", "shm_device_error"]


@dataclass(frozen=True)
class Backend:
    """Where a backend's classes live and what it can move."""

    name: str
    module: str  # holds ``sender`` and ``receiver``
    sender: str
    receiver: str
    host_memory_only: bool = False  # refuses a pool that is not in host memory (shm maps it)
    stages: bool = False  # takes the staging options (tcp)
    takes_options: bool = False  # takes the engine options of DisaggConfig.engine_options (mooncake)

    def classes(self) -> tuple[type[KVSender], type[KVReceiver]]:
        if self.name in ENGINE_LIBRARIES:
            why = library_error(self.name)
            if why is not None:
                raise BackendUnavailable(why)
        module = importlib.import_module(self.module)
        return getattr(module, self.sender), getattr(module, self.receiver)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("tcp", "pdserve.disagg.transfer.tcp", "TcpSender", "TcpReceiver", stages=True),
    Backend("shm", "pdserve.disagg.transfer.shm", "ShmSender", "ShmReceiver", host_memory_only=True),
    Backend("nixl", "pdserve.disagg.transfer.nixl", "NixlSender", "NixlReceiver"),
    Backend("mooncake", "pdserve.disagg.transfer.mooncake", "MooncakeSender", "MooncakeReceiver", takes_options=True),
    Backend("sim", "pdserve.sim.transfer", "SimSender", "SimReceiver"),
)}
assert set(REGISTRY) == set(ALL_BACKENDS), "every backend named in disagg.config has a registry entry"


class BackendUnavailable(RuntimeError):
    """The backend's transfer engine cannot be loaded on this machine (the message names the extra)."""


class DevicePoolError(ValueError):
    """The chosen transfer backend cannot move pages of a pool on this device."""


def create_sender(
    backend: str, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
    auth: PlaneAuth | None = None, idle_timeout: float = 60.0, staging: bool | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES, options: dict[str, str] | None = None,
) -> KVSender:
    """A sender for ``pool``; ``staging`` (tcp only) forces host staging on or off (None: when the
    pool is not host memory); ``options``: the backend's engine options (mooncake's protocol)."""
    spec = _check_pool(backend, pool, staging)
    sender_cls, _ = spec.classes()
    return sender_cls(pool, on_done, io_timeout, auth, idle_timeout, **_extra(spec, staging, staging_bytes, options))


def create_receiver(
    backend: str, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
    guard: ReceiverGuard | None = None, staging: bool | None = None, staging_bytes: int = DEFAULT_STAGING_BYTES,
    options: dict[str, str] | None = None,
) -> KVReceiver:
    """A receiver for ``pool`` (the ``shm`` backend moves the pool into shared memory first);
    ``staging`` and ``options`` as for :func:`create_sender`."""
    spec = _check_pool(backend, pool, staging)
    _, receiver_cls = spec.classes()
    return receiver_cls(pool, on_event, host, io_timeout, guard, **_extra(spec, staging, staging_bytes, options))


def _extra(spec: Backend, staging: bool | None, staging_bytes: int, options: dict[str, str] | None) -> dict:
    extra: dict = {}
    if spec.stages:
        extra.update(staging=staging, staging_bytes=staging_bytes)
    if spec.takes_options and options:
        extra.update(options)
    return extra


def _check_pool(backend: str, pool: KVPool, staging: bool | None) -> Backend:
    spec = REGISTRY.get(backend)
    if spec is None:
        raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")
    if staging and not spec.stages:
        raise ValueError(f"host staging is a tcp backend option; the {backend} backend has none")
    if spec.host_memory_only and pool.device.type != "cpu":
        raise DevicePoolError(shm_device_error(str(pool.device)))
    return spec
