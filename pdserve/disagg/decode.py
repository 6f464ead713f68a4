"""Decode side of P/D: reserve pages, ask the right prefill rank to fill them, continue decoding.

A :class:`DecodeDisaggManager` lives in a decode worker next to its :class:`EngineCore` and is
driven from the engine thread: :meth:`add` instead of ``core.add_request``, :meth:`abort` instead
of ``core.abort``, and every loop iteration ``outputs, meta = manager.process(core.step())``.

Per room, two things happen concurrently: the scheduler reserves pages for the prompt, and an
event-loop thread resolves the prefill rank (explicit; else ``room % prefill_dp_size`` when the
prefill server follows the room; else the room's registration, long-polled) and its
:class:`RankInfo` from the prefill server's bootstrap service. When both are done, the layouts are
compared and a :class:`KVRequest` goes to the prefill rank's control socket. The transfer
backend's receiver then reports ``Accepted``, ``Pages``, ``Aux`` and ``Status``; ``Status(ok)``
activates the request with prefill's first token. Every phase has a bound, and its error names
the room, both ranks and what was awaited.

While a room is open for writes, the receive holds its own reference to the room's pages
(:meth:`KVPool.ref`), next to the request's; it is dropped once no writer can touch them (the room
finished, the receiver closed it, prefill confirmed it stopped, or the quarantine expired).

Liveness: each control connection carries ZMQ heartbeats (every :data:`HEARTBEAT_INTERVAL_S`, the
peer is dropped after two missed) and is watched by a socket monitor; when a prefill rank's
connection drops (its process died or restarted) or cannot be made, the rooms that depend on it
fail at once and the cached bootstrap answers of its server are dropped, so the next room resolves
the restarted rank (possibly with another DP size). A room that fails before it reached its prefill
rank (refused, aborted while resolving) is reported to the prefill server's bootstrap service,
which fails the prefill half.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from pdserve.disagg import messages as m
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.bootstrap import BootstrapClient, BootstrapError
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.errors import PD_FAILURE_STATUS, RoomConflictError
from pdserve.disagg.prefill import IDLE_CHECK_S, model_id
from pdserve.disagg.room import PEER_GRACE_S, Event, RoomMachine, Side, State, bounds
from pdserve.disagg.stats import DisaggMeta, DisaggReport, TransferStats
from pdserve.disagg.threads import EventLoopThread, Inbox
from pdserve.disagg.transfer import PeerLost, ReceiverEvent, ReceiverGuard, create_receiver
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.request import Req, RequestError, StepOutput, TokenLogprobs, sample_rid
from pdserve.kv_events import page_hashes

logger = logging.getLogger("pdserve.disagg.decode")

HEARTBEAT_INTERVAL_S = 5.0  # ZMQ heartbeat on each control connection (as SGLang); dropped after 2 missed
MONITOR_POLL_S = 0.1  # how often control-connection events are read
ROOM_CHECK_S = 1.0  # vLLM's NIXL style: how long decode waits for the answered room's registration
REFUSAL_TIMEOUT_S = 2.0  # telling a prefill server's bootstrap service that decode refused a room


@dataclass
class _Resolved:
    """Outcome of a rank lookup, posted from the event-loop thread."""

    room: _Room
    rank: int | None = None
    info: m.RankInfo | None = None
    error: BootstrapError | None = None


@dataclass
class _Arrived:
    """A receiver event stamped with its arrival time on the receiver thread."""

    at: float
    event: ReceiverEvent


@dataclass
class _SendFailed:
    room: _Room
    error: str


@dataclass
class _ControlLost:
    """The control connection to a prefill rank dropped or could not be made."""

    endpoint: str
    reason: str


@dataclass
class _Room:
    room: int
    rid: str
    req: Req
    host: str
    port: int
    added_at: float
    prefill_rank: int | None = None
    info: m.RankInfo | None = None
    pages_ready: bool = False
    kvreq_at: float | None = None
    acked_at: float | None = None
    first_data_at: float | None = None
    aux: m.Aux | None = None
    nbytes: int = 0
    receiving: list[int] | None = None  # pages the open receive holds a reference to
    prefill_instance: str | None = None  # vLLM's protocol: the prefill server its engine id names
    room_known: bool = False  # vLLM's NIXL style: prefill answered, its server must have registered the room
    machine: RoomMachine | None = None  # the room's state and the bound of each (disagg/room.py)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class DecodeDisaggManager:
    """P/D bookkeeping of one decode DP rank. Not thread-safe: call it from the engine thread."""

    def __init__(self, core: EngineCore, config: DisaggConfig, dp_rank: int, model: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        config.validate()
        self.clock = clock  # the rooms' bounds run on it
        self.bounds = bounds(Side.DECODE, config, PEER_GRACE_S)
        self.core = core
        self.scheduler = core.scheduler
        self.pool = core.kv_pool
        self.config = config
        self.rank = dp_rank
        self.model = model or model_id(core)
        self.inbox = Inbox()
        self.auth = PlaneAuth(config.secret)
        self.stats = TransferStats("decode")
        self.receiver = create_receiver(
            config.transfer_backend, self.pool, lambda e: self.inbox.put(_Arrived(time.monotonic(), e)), config.host,
            config.transfer_timeout,
            guard=ReceiverGuard(self.auth, self.stats.refusals, config.max_connections, config.handshake_timeout,
                                config.idle_timeout),
            options=config.engine_options(),
        )
        self.receiver_info = self.receiver.info()
        self.rooms: dict[int, _Room] = {}
        self.by_rid: dict[str, _Room] = {}
        self.quarantine: dict[int, tuple[list[int], float]] = {}  # receive references a writer may still use
        self.meta: dict[str, DisaggMeta] = {}  # P/D meta_info of requests until their last output
        self._extra: list[StepOutput] = []
        self._sample_input_logprobs: dict[str, TokenLogprobs] = {}  # for each forked sample's first output
        self._io = EventLoopThread(f"decode-ctl-{dp_rank}")
        self._zmq = zmq.Context()
        self._push: dict[str, zmq.Socket] = {}  # used on the event-loop thread only
        self._clients: dict[tuple[str, int], BootstrapClient] = {}  # likewise
        self._server_info: dict[tuple[str, int], m.BootstrapInfo] = {}  # likewise
        self._rank_info: dict[tuple[str, int, int], m.RankInfo] = {}  # likewise
        self._monitors: dict[str, tuple[zmq.Socket, bool]] = {}  # endpoint -> (monitor, ever connected); likewise
        self._io.submit(self._watch_control())
        self.scheduler.on_pages_allocated = self._on_pages

    def close(self) -> None:
        async def shutdown() -> None:
            for sock in self._push.values():
                sock.close(0)
            for mon, _ in self._monitors.values():
                mon.close(0)
            for client in self._clients.values():
                await client.close()

        try:
            self._io.run(shutdown(), 5.0)
        except Exception:  # closing anyway
            logger.debug("decode rank %d: control shutdown incomplete", self.rank, exc_info=True)
        self._io.stop()
        self._zmq.term()
        self.receiver.close()
        self.inbox.close()

    def fileno(self) -> int:
        """Readable when :meth:`process` has network events to apply."""
        return self.inbox.fileno()

    def timeout_s(self) -> float | None:
        """Longest the caller may wait before calling :meth:`process` again (None: until :meth:`fileno`)."""
        return IDLE_CHECK_S if (self.rooms or self.quarantine) else None

    # ------------------------------------------------------------------ requests
    def add(
        self,
        req: Req,
        room: int,
        bootstrap_host: str,
        bootstrap_port: int | None = None,
        prefill_rank: int | None = None,
        prefill_instance: str | None = None,
        room_known: bool = False,
    ) -> None:
        """Admit a decode request whose prompt KV comes from the prefill server at ``bootstrap_host``;
        ``prefill_instance``: that server's instance id as vLLM's ``kv_transfer_params`` named it (checked
        against its bootstrap service before the KV is asked for); ``room_known``: the prefill half has
        answered, so the room must be registered there, at ``prefill_rank``."""
        if room in self.rooms or room in self.quarantine:
            raise RoomConflictError(f"bootstrap_room {room} is already active on decode rank {self.rank}")
        if prefill_rank is not None and prefill_rank < 0:
            raise RequestError(f"prefill DP rank must be >= 0, got {prefill_rank}")
        if not self.config.bootstrap_allowed(bootstrap_host):
            raise RequestError(f"bootstrap_host {bootstrap_host!r} is outside --disaggregation-allowed-bootstrap "
                               f"({', '.join(self.config.allowed_networks())})")
        self.core.validate(req)
        if req.rid in self.by_rid:
            raise RequestError(f"rid {req.rid!r} is already in use")
        self.scheduler.ids.check_free(req.rid, req.num_samples)
        port = self.config.bootstrap_port if bootstrap_port is None else bootstrap_port
        r = _Room(room, req.rid, req, bootstrap_host, port, time.monotonic(), prefill_rank,
                  prefill_instance=prefill_instance, room_known=room_known)
        r.machine = RoomMachine(Side.DECODE, self.bounds, self.clock)
        self.rooms[room] = r
        self.by_rid[req.rid] = r
        future = self._io.submit(self._resolve(r))
        future.add_done_callback(lambda f: f.cancelled() or self.inbox.put(f.result()))
        self.scheduler.add_prefilled_request(req)

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        """Abort a request; its prefill rank learns at once and stops sending."""
        r = self.by_rid.get(rid)
        if r is None:
            return self.core.abort(rid, message)
        self._fail(r, message, m.Cause.DECODE_ABORTED, tell_prefill=True)
        return True

    # ------------------------------------------------------------------ engine loop
    def process(self, outputs: list[StepOutput]) -> tuple[list[StepOutput], dict[str, DisaggMeta]]:
        """Apply network events (activations, failures, timeouts). Returns the outputs to deliver
        and P/D ``meta_info`` fields per rid among them."""
        for item in self.inbox.drain():
            if isinstance(item, _Resolved):
                self._on_resolved(item)
            elif isinstance(item, _SendFailed):
                if self.rooms.get(item.room.room) is item.room:
                    self._fail(item.room, item.error, m.Cause.TRANSFER_ERROR, tell_prefill=False)
            elif isinstance(item, _ControlLost):
                self._on_control_lost(item)
            elif isinstance(item.event, PeerLost):
                self._on_peer_lost(item.event)
            else:
                self._on_stream(item.event, item.at)
        self._check_timeouts(time.monotonic())
        result = outputs + self._extra
        self._extra = []
        meta: dict[str, DisaggMeta] = {}
        for out in result:
            if self._sample_input_logprobs and out.rid in self._sample_input_logprobs:
                out.input_logprobs = self._sample_input_logprobs.pop(out.rid)
            fields = self.meta.pop(out.rid, None) if out.finished else self.meta.get(out.rid)
            if fields is not None:
                meta[out.rid] = fields
        return result, meta

    def metrics(self) -> DisaggReport:
        rooms = list(self.rooms.values())
        return self.stats.snapshot({
            "resolving": sum(1 for r in rooms if r.machine.state is State.RESOLVING),
            "waiting_for_pages": sum(1 for r in rooms if not r.pages_ready),  # also while resolving
            "waiting_for_prefill": sum(1 for r in rooms if r.machine.state in (State.REQUESTED, State.ACCEPTED)),
            "transferring": sum(1 for r in rooms if r.machine.state is State.STREAMING),
            "quarantined": len(self.quarantine),
        })

    # ------------------------------------------------------------------ resolution (event-loop thread)
    async def _resolve(self, r: _Room) -> _Resolved:
        key = (r.host, r.port)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = BootstrapClient(r.host, r.port, self.auth)
        deadline = r.added_at + self.config.bootstrap_timeout
        rank = r.prefill_rank
        try:
            if r.prefill_instance is not None:
                await self._check_instance(r, client, key, deadline)
            if rank is None:
                server = self._server_info.get(key)
                if server is None:
                    server = self._server_info[key] = await client.info(deadline)
                rank = r.room % server.dp_size if server.follows_room else await client.room_rank(r.room, deadline)
            info = self._rank_info.get((*key, rank))
            if info is None:
                info = self._rank_info[(*key, rank)] = await client.rank_info(rank, deadline, r.room)
            return _Resolved(r, rank, info)
        except BootstrapError as e:
            return _Resolved(r, rank, error=e)
        except Exception as e:  # a bug here must fail the room, not strand it
            what = "the prefill rank and its info"
            return _Resolved(r, rank, error=BootstrapError(f"lookup failed: {e!r}", what, m.Cause.BOOTSTRAP_ERROR))

    async def _check_instance(self, r: _Room, client: BootstrapClient, key: tuple[str, int], deadline: float) -> None:
        """The prefill server at ``key`` is the instance the room's engine id names (a cached answer
        that differs is asked again: the server may have restarted); a BootstrapError (400) otherwise."""
        server = self._server_info.get(key)
        if server is None or server.instance_id != r.prefill_instance:
            server = self._server_info[key] = await client.info(deadline)
        if server.instance_id != r.prefill_instance:
            raise BootstrapError(
                f"kv_transfer_params.remote_engine_id names prefill instance {r.prefill_instance}, but the prefill "
                f"server at {r.bootstrap} is instance {server.instance_id or '(none: not a pdserve prefill server)'}",
                "kv_transfer_params.remote_engine_id", m.Cause.BAD_TRANSFER_PARAMS, 400)
        if r.prefill_rank is not None and not 0 <= r.prefill_rank < server.dp_size:
            raise BootstrapError(
                f"kv_transfer_params.remote_engine_id names prefill DP rank {r.prefill_rank}, but the prefill server at "
                f"{r.bootstrap} has {server.dp_size} (ranks 0..{server.dp_size - 1})",
                "kv_transfer_params.remote_engine_id", m.Cause.BAD_TRANSFER_PARAMS, 400)
        if not r.room_known:
            return
        try:  # registered when the prefill half was dispatched, before it answered: no long wait
            holder = await client.room_rank(r.room, min(deadline, time.monotonic() + ROOM_CHECK_S))
        except BootstrapError as e:
            if e.status:
                raise
            raise BootstrapError(
                f"kv_transfer_params.remote_room {r.room} is not a room of the prefill server at {r.bootstrap} "
                "(no prefill request for it was dispatched there)", "kv_transfer_params.remote_room",
                m.Cause.BAD_TRANSFER_PARAMS, 400) from None
        if holder != r.prefill_rank:
            raise BootstrapError(
                f"kv_transfer_params.remote_engine_id names prefill DP rank {r.prefill_rank}, but room {r.room} is on "
                f"prefill DP rank {holder} of the server at {r.bootstrap}", "kv_transfer_params.remote_engine_id",
                m.Cause.BAD_TRANSFER_PARAMS, 400)

    async def _watch_control(self) -> None:
        """Read the control sockets' monitors; report a lost (or never made) connection to the engine
        thread once, and drop that socket so the next room reconnects from fresh bootstrap answers."""
        import asyncio

        from zmq.utils.monitor import parse_monitor_message

        while True:
            await asyncio.sleep(MONITOR_POLL_S)
            for endpoint, (mon, connected) in list(self._monitors.items()):
                lost = None
                while lost is None:
                    try:
                        event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))["event"]
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        lost = "its monitor failed"
                        break
                    if event == zmq.EVENT_CONNECTED:
                        connected = True
                        self._monitors[endpoint] = (mon, True)
                    elif event == zmq.EVENT_DISCONNECTED and connected:
                        lost = "the control connection dropped (the prefill worker died, restarted or missed 2 heartbeats)"
                    elif event == zmq.EVENT_CONNECT_RETRIED and not connected:
                        lost = "nothing accepts connections there (the prefill worker is gone)"
                if lost is not None:
                    self._drop_control(endpoint)
                    self.inbox.put(_ControlLost(endpoint, lost))

    def _drop_control(self, endpoint: str) -> None:
        sock = self._push.pop(endpoint, None)
        if sock is not None:
            sock.close(0)
        mon = self._monitors.pop(endpoint, None)
        if mon is not None:
            mon[0].close(0)
        for key in [k for k, info in self._rank_info.items() if info.control_endpoint == endpoint]:
            del self._rank_info[key]
            self._server_info.pop(key[:2], None)

    def _tell_bootstrap(self, r: _Room, reason: str, status: int) -> None:
        """The room failed before a KV request reached its prefill rank: let the prefill server fail its
        half now rather than after the waiting timeout (best effort, bounded)."""
        refusal = m.RoomRefusal(r.room, reason, status)

        async def tell() -> None:
            client = self._clients.get((r.host, r.port))
            if client is None:
                return
            try:
                await client.refuse_room(refusal, time.monotonic() + REFUSAL_TIMEOUT_S)
            except Exception as e:
                logger.info("decode rank %d: could not tell %s that room %d failed: %s", self.rank, r.bootstrap,
                            r.room, e)

        self._io.submit(tell())

    def _forget_server(self, host: str, port: int) -> None:
        """Drop cached bootstrap answers of a prefill server that stopped answering (it may have restarted)."""

        def forget() -> None:
            self._server_info.pop((host, port), None)
            for key in [k for k in self._rank_info if k[:2] == (host, port)]:
                del self._rank_info[key]

        self._io.loop.call_soon_threadsafe(forget)

    def _send_control(self, r: _Room, msg: m.ControlMsg) -> None:
        assert r.info is not None
        endpoint, data = r.info.control_endpoint, m.CONTROL.encode(msg, self.auth)

        def push() -> None:
            sock = self._push.get(endpoint)
            if sock is None:
                sock = self._push[endpoint] = self._zmq.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL_S * 1000))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(2 * HEARTBEAT_INTERVAL_S * 1000))
                events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                self._monitors[endpoint] = (sock.get_monitor_socket(events), False)
                sock.connect(endpoint)
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if isinstance(msg, m.KVRequest):
                    self.inbox.put(_SendFailed(r, f"{self._who(r)}: cannot send the KV request to {endpoint}: {e}"))

        self._io.loop.call_soon_threadsafe(push)

    # ------------------------------------------------------------------ handshake
    def _on_resolved(self, res: _Resolved) -> None:
        r = res.room
        if self.rooms.get(r.room) is not r:
            return
        r.prefill_rank = res.rank
        if res.error is not None:
            if res.error.cause == m.Cause.BAD_TRANSFER_PARAMS:  # lying params: the room they name may be another's
                self._fail(r, f"{self._who(r)}: {res.error}", res.error.cause, tell_prefill=False, status=400,
                           param=res.error.awaited)
                return
            if res.error.cause == m.Cause.PREFILL_REJECTED:  # the prefill server refused its half: nothing to tell
                self._fail(r, f"{self._who(r)}: {res.error}", res.error.cause, tell_prefill=False,
                           status=res.error.status or PD_FAILURE_STATUS)
                return
            # no such prefill rank (404) is the request's fault: 400, not retried
            status = 400 if res.error.status in (400, 404) else PD_FAILURE_STATUS
            self._fail(r, f"{self._who(r)}: {res.error}", res.error.cause, tell_prefill=True, status=status)
            return
        r.info = res.info
        if self._fire(r, Event.RESOLVED):
            self._maybe_request(r)

    def _on_pages(self, req: Req) -> None:
        r = self.by_rid.get(req.rid)
        if r is not None and self._fire(r, Event.PAGES):
            r.pages_ready = True
            self._maybe_request(r)

    def _maybe_request(self, r: _Room) -> None:
        if not (r.pages_ready and r.info is not None and r.kvreq_at is None):
            return
        info = r.info
        diff = self.pool.layout.mismatch(info.layout)
        if diff is None and info.model != self.model:
            diff = f"model differs: {info.model} vs {self.model}"
        if diff is None and info.backend != self.config.transfer_backend:
            diff = f"transfer backend differs: {info.backend} vs {self.config.transfer_backend}"
        if diff is not None:
            self._fail(r, f"{self._who(r)}: KV layout mismatch between prefill and decode, refused at the handshake: "
                       f"{diff}", m.Cause.LAYOUT_MISMATCH, tell_prefill=True)
            return
        ids = r.req.input_ids
        cached = r.req.decode_cached_tokens
        hashes = page_hashes(ids[:cached], self.pool.page_size)
        r.receiving = r.req.pages[cached // self.pool.page_size :]
        self.pool.ref(r.receiving)
        self.receiver.open_room(r.room, r.receiving)
        request = m.KVRequest(
            r.room, self.rank, info.rank, self.receiver_info, list(r.receiving), len(ids), m.prompt_hash(ids),
            self.pool.layout, self.model, cached, hashes[-1] if hashes else 0,
        )
        r.kvreq_at = time.monotonic()
        if self._fire(r, Event.REQUEST_SENT):
            self._send_control(r, request)

    # ------------------------------------------------------------------ stream events
    def _on_stream(self, msg: m.StreamMsg, now: float) -> None:
        r = self.rooms.get(msg.room)
        if isinstance(msg, m.Status) and msg.room in self.quarantine:
            self._release_quarantine(msg.room)
        if r is None or r.kvreq_at is None:
            return  # a late message for a room already finished or failed here
        if isinstance(msg, m.Accepted):
            r.acked_at = now
            if r.machine.state is State.REQUESTED:  # a repeated Accepted changes nothing
                self._fire(r, Event.ACCEPTED)
        elif isinstance(msg, m.Pages):
            r.acked_at = r.acked_at or now
            r.first_data_at = r.first_data_at or now
            r.nbytes += len(msg.dst_pages) * self.pool.layout.num_layers * self.pool.page_bytes()
            self._fire(r, Event.DATA)
        elif isinstance(msg, m.Aux):
            r.aux = msg
            r.machine.progress()
        elif msg.ok:
            self._activate(r, now)
        else:
            reason = msg.reason or "prefill failed without a reason"
            self._fail(r, f"prefill failed: {reason}", msg.cause or m.Cause.PREFILL_ABORTED, tell_prefill=False,
                       writer_done=True, status=msg.status or PD_FAILURE_STATUS)

    def _on_control_lost(self, lost: _ControlLost) -> None:
        for r in list(self.rooms.values()):
            if r.info is not None and r.info.control_endpoint == lost.endpoint:
                self._fail(r, f"{self._who(r)}: lost prefill rank {r.info.rank} (pid {r.info.pid}) at {lost.endpoint}: "
                           f"{lost.reason}", m.Cause.PEER_LOST, tell_prefill=False)

    def _on_peer_lost(self, lost: PeerLost) -> None:
        for room in lost.rooms:
            if room in self.quarantine:
                self._release_quarantine(room)
            r = self.rooms.get(room)
            if r is not None and r.kvreq_at is not None:
                self._fail(r, f"{self._who(r)}: lost the KV transfer connection from {lost.peer}: {lost.reason}",
                           m.Cause.TRANSFER_ERROR, tell_prefill=True)

    def _activate(self, r: _Room, now: float) -> None:
        if r.aux is None:
            self._fail(r, f"{self._who(r)}: prefill reported success without the first-token record",
                       m.Cause.TRANSFER_ERROR, tell_prefill=False, writer_done=True)
            return
        if not self._fire(r, Event.COMPLETED):
            return
        self.receiver.close_room(r.room)
        self._end_receive(r)
        self._forget(r)
        transfer_s = now - (r.first_data_at or now)
        self.stats.record_transfer(r.nbytes, transfer_s)
        self.meta[r.rid] = self._meta(r, transfer_s, now - r.added_at)
        aux = r.aux
        if aux.first_token is None:  # max_new_tokens=0: prefill produced no token, nothing to decode
            self._finish_without_tokens(r.rid, aux)
            return
        samples = r.req.params.n  # forking sets the request's own n to 1
        self.scheduler.activate_prefilled(r.rid, aux.first_token, aux.logprobs, aux.cached_tokens, aux.input_logprobs)
        if aux.input_logprobs is not None:  # each sample reports the prompt's input logprobs too
            for i in range(1, samples):
                self._sample_input_logprobs[sample_rid(r.rid, i)] = aux.input_logprobs

    def _finish_without_tokens(self, rid: str, aux: m.Aux) -> None:
        """``max_new_tokens`` 0: end the request and each of its samples (never forked: there is
        nothing to decode) with length 0, and free the prompt's pages."""
        req = self.scheduler.drop_prefilled(rid)  # pages, slot and the request's ids (samples' too) freed
        for out_rid in [rid, *(sample_rid(rid, i) for i in range(1, req.params.n))]:
            self._extra.append(
                StepOutput(out_rid, [], finished=True, finish_reason={"type": "length", "length": 0},
                           input_logprobs=aux.input_logprobs, prompt_tokens=len(req.input_ids),
                           cached_tokens=aux.cached_tokens)
            )

    # ------------------------------------------------------------------ failure
    def _fail(self, r: _Room, reason: str, cause: str, tell_prefill: bool, writer_done: bool = False,
              status: int = PD_FAILURE_STATUS, param: str | None = None) -> None:
        """Fail a room: abort the request with ``reason`` (answering HTTP ``status`` if no token went
        out), tell prefill when asked (on its control socket, or through its bootstrap service while
        the rank is unknown), and drop the receive's page references now, or once the remote writer is
        known to be done with the pages (``writer_done``: it said so)."""
        if r.machine is not None and not r.machine.done:
            r.machine.fire(Event.FAILED, cause, reason or cause)
        self._forget(r)
        self.stats.record_failure(cause)
        logger.info("decode rank %d: room %d failed (%s): %s", self.rank, r.room, cause, reason)
        if tell_prefill and r.info is not None:
            self._send_control(r, m.Abort(r.room, reason, self.rank))
        elif tell_prefill:
            self._tell_bootstrap(r, f"decode rank {self.rank} gave up on room {r.room}: {reason}", status)
        if r.kvreq_at is not None:
            stopped = self.receiver.close_room(r.room) or writer_done
            if stopped:
                self._end_receive(r)
            elif r.receiving:
                self.quarantine[r.room] = (r.receiving, time.monotonic() + self.config.transfer_timeout)
                r.receiving = None
        self.meta[r.rid] = self._meta(r, 0.0, time.monotonic() - r.added_at)
        if not self.scheduler.abort(r.rid, reason, status_code=status, param=param):
            self.meta.pop(r.rid, None)

    def _fire(self, r: _Room, event: Event) -> bool:
        """Move the room's state machine (an event it does not allow fails the room); whether it lives on."""
        return r.machine.fire_or(event, lambda why: self._fail(r, f"{self._who(r)}: {why}", m.Cause.TRANSFER_ERROR,
                                                               tell_prefill=True))

    def _forget(self, r: _Room) -> None:
        self.rooms.pop(r.room, None)
        self.by_rid.pop(r.rid, None)

    def _end_receive(self, r: _Room) -> None:
        if r.receiving is not None:
            self.pool.unref(r.receiving)
            r.receiving = None

    def _release_quarantine(self, room: int) -> None:
        pages, _ = self.quarantine.pop(room)
        self.pool.unref(pages)

    def _check_timeouts(self, now: float) -> None:
        """Fail every room that outlived its state's bound (the table in :func:`disagg.room.bounds`)."""
        cfg = self.config
        clock_now = self.clock()
        for r in list(self.rooms.values()):
            bound = r.machine.overdue(clock_now)
            if bound is None:
                continue
            state = r.machine.state
            if state is State.RESOLVING:  # backstop: the resolver reports its own timeout
                self._fail(r, f"{self._who(r)}: no answer from the bootstrap service at {r.bootstrap} within "
                           f"{cfg.bootstrap_timeout:g} s ({bound.flag})", bound.cause, tell_prefill=False)
            elif state is State.WAITING_FOR_PAGES:
                slots = self.scheduler.slots
                self._fail(r, f"{self._who(r)}: no free KV pages or running slot ({slots.num_held} of "
                           f"--max-running-requests {slots.size} in use) for the {len(r.req.input_ids)}-token "
                           f"prompt within {cfg.waiting_timeout:g} s ({bound.flag})", bound.cause, tell_prefill=True)
            elif state is State.REQUESTED:
                self._forget_server(r.host, r.port)
                self._fail(r, f"{self._who(r)}: the prefill rank at {r.info.control_endpoint} did not acknowledge "
                           f"the KV request within {cfg.bootstrap_timeout:g} s ({bound.flag}); is the prefill "
                           "server down?", bound.cause, tell_prefill=True)
            elif state is State.ACCEPTED:  # prefill's own waiting timeout normally says why first
                self._fail(r, f"{self._who(r)}: prefill acknowledged the KV request but sent no KV within "
                           f"{cfg.waiting_timeout:g} s ({bound.flag}): the prefill request did not reach that rank "
                           "or is still queued", bound.cause, tell_prefill=True)
            else:
                self._fail(r, f"{self._who(r)}: the KV transfer stalled for {cfg.transfer_timeout:g} s "
                           f"({bound.flag})", bound.cause, tell_prefill=True)
        for room, (_, expiry) in list(self.quarantine.items()):
            if now > expiry:
                logger.warning("decode rank %d: room %d: prefill never confirmed it stopped writing; "
                               "freeing its pages after %g s", self.rank, room, cfg.transfer_timeout)
                self._release_quarantine(room)

    def _who(self, r: _Room) -> str:
        prefill = "?" if r.prefill_rank is None else r.prefill_rank
        return (f"room {r.room} (decode rank {self.rank}, prefill rank {prefill} of the prefill server with "
                f"bootstrap {r.bootstrap})")

    def _meta(self, r: _Room, transfer_s: float, wait_s: float) -> DisaggMeta:
        return DisaggMeta(
            bootstrap_room=r.room,
            prefill_dp_rank=r.prefill_rank,
            decode_dp_rank=self.rank,
            kv_transfer_bytes=r.nbytes,
            kv_transfer_ms=round(transfer_s * 1000, 3),
            kv_wait_ms=round(wait_s * 1000, 3),
            decode_cached_tokens=r.req.decode_cached_tokens,
        )
