"""``nixl`` backend: prefill WRITEs pages into decode's registered pool with NIXL (its UCX plugin).

Each rank creates one NIXL agent and registers its pool's layers once (DRAM for a CPU pool, VRAM for a
CUDA pool: the memory type follows the pool's device, the code is the same). The decode agent's
metadata (UCX worker address and memory keys) travels in its ``ReceiverInfo``, inside the KV request
sealed with the deployment's secret; prefill loads it from there only — NIXL's own metadata listener
and etcd are never used, so no unauthenticated peer can hand us an agent. Decode needs nothing of
prefill's: a WRITE is one-sided.

A page job becomes one NIXL transfer: descriptors from the two block tables (runs of pages
consecutive on both sides merged, per layer; :func:`.registered.page_spans`), WRITE with a notification
``"<prefill agent>/<room>/<seq>"``. NIXL refuses remote descriptors outside the memory the decode agent
registered (a lying ``ReceiverInfo`` fails the room, named). When NIXL reports the transfer done, prefill
releases its source pages and sends the ``Pages`` frame on the authenticated stream carrying the
notification's text; decode reports the frame — to its manager and so to the room's state machine —
only once that NIXL notification has arrived from the agent it names (NIXL delivers a notification after
the transfer's data), within the transfer timeout, else the room fails: a partial transfer never
activates a room. Why push rather than vLLM's pull: see :mod:`.registered`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from pdserve.disagg import messages as m
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.config import prepare_engine_environment
from pdserve.disagg.transfer.base import ReceiverEvent, ReceiverGuard, SendResult
from pdserve.disagg.transfer.registered import (
    Backoff,
    check_registration,
    layer_regions,
    memory_type,
    page_spans,
    registration,
)
from pdserve.disagg.transfer.stream import (
    StreamReceiver,
    StreamSender,
    _Destination,
    _Job,
    frame,
    peer_closed,
    send_buffers,
)
from pdserve.engine.kv_pool import KVPool

logger = logging.getLogger("pdserve.disagg.transfer")

MAX_REMOTE_AGENTS = 256  # decode agents a prefill rank keeps loaded (a restarted decode has a new one)
MAX_NOTIFICATIONS = 4096  # notifications a decode rank keeps for frames that have not come yet
NOTIFICATION_AGE_S = 120.0  # ... and for at most this long
LIVENESS_CHECK_S = 0.1  # a write in progress looks at its stream connection this often
# NIXL's UCX error handling: "peer" (NIXL's default) has UCX report a dead peer itself, and rules out UCX's
# shared-memory transports (on one host RMA then runs over tcp/lo); "none" lets UCX use them, and a dead
# decode is then noticed by the stream's liveness watch and the transfer timeout only. A benchmark knob, read
# when an agent starts: $PDSERVE_NIXL_UCX_ERROR_HANDLING.
UCX_ERROR_HANDLING_ENV = "PDSERVE_NIXL_UCX_ERROR_HANDLING"


def new_agent(role: str):
    """One NIXL agent with the UCX backend, its progress thread, locking for our several threads, and
    neither a metadata listener nor etcd (metadata moves on the authenticated plane only)."""
    prepare_engine_environment("nixl")
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    name = f"pdserve-{role}-{os.getpid()}-{secrets.token_hex(6)}"
    config = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=[],
                               sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    agent = nixl_agent(name, config)
    if "UCX" not in agent.get_plugin_list():
        raise RuntimeError(f"NIXL has no UCX plugin here (plugins found: {agent.get_plugin_list()})")
    agent.create_backend("UCX", {"ucx_error_handling_mode": os.environ.get(UCX_ERROR_HANDLING_ENV, "peer")})
    return agent


def register_pool(agent, pool: KVPool):
    """Register every layer of ``pool`` with ``agent``, once; returns the registration handle."""
    mem, device = memory_type(pool)
    return agent.register_memory([(addr, size, device, "") for addr, size in layer_regions(pool)], mem)


class NixlSender(StreamSender):
    backend = "nixl"

    def __init__(self, pool: KVPool, on_done: Callable[[SendResult], None], io_timeout: float,
                 auth: PlaneAuth | None = None, idle_timeout: float = 60.0) -> None:
        self.agent = new_agent("prefill")
        self.mem, self.device = memory_type(pool)
        self._registered = register_pool(self.agent, pool)
        self._remote: OrderedDict[str, bytes] = OrderedDict()  # loaded decode agents -> their metadata
        self._remote_lock = threading.Lock()
        self._seq = itertools.count()
        super().__init__(pool, on_done, io_timeout, auth, idle_timeout)
        logger.info("nixl KV transfer: agent %s registered %d %s layers", self.agent.name, len(pool.layers), self.mem)

    def write_pages(self, dest: _Destination, job: _Job) -> int:
        reg = check_registration(dest.info, self.pool)
        peer = self._load(reg)
        spans = page_spans(self.pool, reg, dest.info.num_pages, job.src_pages, job.dst_pages)
        token = f"{self.agent.name}/{job.room}/{next(self._seq)}"
        local = self.agent.get_xfer_descs(_descs(spans.src, spans.lengths, self.device), self.mem)
        remote = self.agent.get_xfer_descs(_descs(spans.dst, spans.lengths, reg.device), reg.mem)
        try:
            handle = self.agent.initialize_xfer("WRITE", local, remote, peer, token.encode())
        except Exception as e:  # nixlNotFoundError: descriptors outside decode's registered memory
            raise ConnectionError(f"NIXL refused the WRITE to decode agent {peer} ({type(e).__name__}: {e}); "
                                  "its descriptors are outside the memory that agent registered") from e
        try:
            self._complete(dest, handle, peer)
        finally:
            with contextlib.suppress(Exception):  # an unfinished transfer is aborted by its release
                self.agent.release_xfer_handle(handle)
        send_buffers(dest.connect(), frame(m.Pages(job.room, job.dst_pages, 0, token)))
        return spans.nbytes

    def _complete(self, dest: _Destination, handle, peer: str) -> None:
        """Post the transfer and wait for NIXL to report it done, within the transfer timeout, giving up
        at once when the stream to that receiver ends (its process died)."""
        state = self.agent.transfer(handle)
        backoff = Backoff(self.io_timeout)
        next_check = time.monotonic() + LIVENESS_CHECK_S
        while state == "PROC":
            if not backoff.wait():
                raise TimeoutError(f"NIXL WRITE to decode agent {peer} not done after {self.io_timeout:g} s")
            state = self.agent.check_xfer_state(handle)
            if state == "PROC" and time.monotonic() > next_check:
                next_check = time.monotonic() + LIVENESS_CHECK_S
                if dest.sock is not None and peer_closed(dest.sock):
                    raise ConnectionError(f"decode receiver {dest.info.address} closed its connection during "
                                          f"the NIXL WRITE to agent {peer}")
        if state != "DONE":
            raise ConnectionError(f"NIXL WRITE to decode agent {peer} failed (state {state})")

    def _load(self, reg: m.RegisteredPool) -> str:
        """Load the decode agent's metadata (once per agent; bounded) and check it names that agent."""
        with self._remote_lock:
            if self._remote.get(reg.peer) == reg.metadata:
                self._remote.move_to_end(reg.peer)
                return reg.peer
            if reg.peer in self._remote:
                self._forget(reg.peer)
            try:
                name = self.agent.add_remote_agent(reg.metadata)
            except Exception as e:
                raise ConnectionError(f"NIXL cannot load decode agent {reg.peer}'s metadata: {type(e).__name__}: {e}") from e
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != reg.peer:
                with contextlib.suppress(Exception):
                    self.agent.remove_remote_agent(name)
                raise ConnectionError(f"decode receiver published agent {reg.peer} with metadata of agent {name}; refused")
            self._remote[name] = reg.metadata
            while len(self._remote) > MAX_REMOTE_AGENTS:
                self._forget(next(iter(self._remote)))
            return name

    def _forget(self, name: str) -> None:
        self._remote.pop(name, None)
        with contextlib.suppress(Exception):
            self.agent.remove_remote_agent(name)

    def close(self) -> None:
        super().close()
        with self._remote_lock:
            for name in list(self._remote):
                self._forget(name)
        with contextlib.suppress(Exception):
            self.agent.deregister_memory(self._registered)


class NixlReceiver(StreamReceiver):
    backend = "nixl"
    close_stops_writes = False  # the prefill agent writes into our memory on its own

    def __init__(self, pool: KVPool, on_event: Callable[[ReceiverEvent], None], host: str, io_timeout: float,
                 guard: ReceiverGuard | None = None) -> None:
        self.agent = new_agent("decode")
        self._registered = register_pool(self.agent, pool)
        self.registration = registration(pool, self.agent.name, self.agent.get_agent_metadata())
        self.notifications = Notifications(self.agent)
        super().__init__(pool, on_event, host, io_timeout, guard)

    def info(self) -> m.ReceiverInfo:
        return m.ReceiverInfo("nixl", self.host, self.port, self.pool.num_pages, registered=self.registration)

    def read_pages(self, sock, msg: m.Pages) -> str | None:
        if msg.nbytes:
            raise ConnectionError(f"room {msg.room}: nixl stream frames carry no payload, got {msg.nbytes} bytes")
        parts = msg.notif.rsplit("/", 2)  # "<prefill agent>/<room>/<seq>"
        if len(parts) != 3 or not parts[0] or parts[1] != str(msg.room) or not parts[2].isdigit():
            return f"the frame names notification {msg.notif[:120]!r}, not one of room {msg.room}"
        agent = parts[0]
        slot, error = self.begin_write(msg.room, msg.dst_pages, sock)
        if slot is None:
            return error  # a closed room (its notification ages out) or pages outside the room
        try:
            if not self.notifications.wait(msg.notif, self.io_timeout):
                return (f"no NIXL notification {msg.notif!r} from agent {agent} within {self.io_timeout:g} s "
                        "of its Pages frame: the pages may not have landed")
        finally:
            self.end_write(slot)
        return None

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self.agent.deregister_memory(self._registered)


class Notifications:
    """The NIXL notifications a decode agent received, kept until their ``Pages`` frame claims them.

    Only a notification whose text starts with the name of the agent that sent it counts, so one
    prefill cannot complete another's frame. Bounded by count and age."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._arrived: OrderedDict[str, float] = OrderedDict()

    def wait(self, token: str, timeout: float) -> bool:
        """Whether ``token`` arrived (now or within ``timeout``); claims it."""
        backoff = Backoff(timeout)
        while True:
            with self._lock:
                if self._arrived.pop(token, None) is not None:
                    return True
                self._poll()
                if self._arrived.pop(token, None) is not None:
                    return True
            if not backoff.wait():
                return False

    def _poll(self) -> None:
        now = time.monotonic()
        for sender, messages in self.agent.get_new_notifs().items():
            for raw in messages:
                token = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                if token.startswith(f"{sender}/"):
                    self._arrived[token] = now
        while self._arrived and (len(self._arrived) > MAX_NOTIFICATIONS
                                 or next(iter(self._arrived.values())) < now - NOTIFICATION_AGE_S):
            self._arrived.popitem(last=False)


def _descs(addrs: list[int], lengths: list[int], device: int) -> np.ndarray:
    """NIXL's ``[N, 3]`` descriptor array: address, length, device id."""
    out = np.empty((len(addrs), 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = lengths
    out[:, 2] = device
    return out
