"""Prefill side of P/D: pairs local requests with decode KV requests by room and ships their KV.

A :class:`PrefillDisaggManager` lives in a prefill worker next to its :class:`EngineCore` and is
driven from the engine thread: :meth:`add` instead of ``core.add_request``, :meth:`abort` instead
of ``core.abort``, and every loop iteration ``outputs, meta = manager.process(core.step())``.
Network I/O runs elsewhere: a PULL socket (control plane, on an event-loop thread) receives
:class:`KVRequest` / :class:`Abort` from decode ranks, the transfer backend's threads send pages.

Per room: whichever of the local request and the decode KV request arrives first waits for the
other (bounded by ``waiting_timeout``). Admission is gated by decode (SGLang's prefill bootstrap
queue): a prefill request waits *outside* the engine — no pages, no slot, nothing computed — until
its KV request has come, which decode sends only once it has reserved the prompt's pages; so a
prefill pool never holds computed KV that no decode will take. Once paired, the request enters
the engine; every complete page is shipped as soon as its chunk is computed, so the transfer
overlaps the next chunk's compute; when prefill finishes, the last pages, an :class:`Aux` record
and ``Status(ok)`` follow. The request's finished output is held back until then. Every queued page send holds its own reference to the pages it reads
(:meth:`KVPool.ref`), dropped when the backend reports the send done, failed or cancelled; so a
request retracted or aborted meanwhile never lets its pages be reused while they are being read.

Liveness: the sender watches its connection to every decode receiver (see
:mod:`pdserve.disagg.transfer.stream`); when one ends, every room bound to that receiver fails at
once (``peer_lost``) and its KV is freed, even while the room's request is still queued, computing
or waiting behind other sends — not only when a send to it fails.

Detached rooms (vLLM's P/D protocol, ``kv_transfer_params.do_remote_decode``): the router sends the
decode half only after prefill answered, so a detached room's finished output is released as soon as
the prompt is computed, while the room keeps holding its KV for the decode's KV request (bounded by
``waiting_timeout`` like any room). A detached room failing later has no client left to tell: its
abort output is dropped here, the decode half learns the reason from the room's ``Status``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from pdserve.disagg import messages as m
from pdserve.disagg.auth import AuthError, PlaneAuth
from pdserve.disagg.bootstrap import BootstrapClient
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.errors import PD_FAILURE_STATUS, RoomConflictError
from pdserve.disagg.room import PEER_GRACE_S, Event, RoomMachine, Side, State, bounds
from pdserve.disagg.stats import DisaggMeta, DisaggReport, TransferStats
from pdserve.disagg.threads import EventLoopThread, Inbox
from pdserve.disagg.transfer import ReceiverLost, SendResult, create_sender
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.request import Req, ReqState, RequestError, StepOutput
from pdserve.kv_events import page_hashes

logger = logging.getLogger("pdserve.disagg.prefill")

IDLE_CHECK_S = 0.25  # how often timeouts are checked while rooms are pending


def max_control_bytes(num_pages: int) -> int:
    """Largest control message a rank accepts (ZMQ ``MAXMSGSIZE``; a peer sending more is disconnected):
    a KV request lists at most one destination page per page of this pool (its prompt must fit here too),
    each at most 9 bytes of msgpack, plus the envelope, layout and names."""
    return (64 << 10) + 9 * num_pages


def model_id(core: EngineCore) -> str:
    """The model name both sides compare at the handshake (the checkpoint folder's name)."""
    return os.path.basename(os.path.normpath(str(core.model_path)))


@dataclass
class _Room:
    room: int
    rid: str
    req: Req
    added_at: float
    kvreq: m.KVRequest | None = None
    pages_sent: int = 0  # prompt pages shipped or skipped (the first ``skip`` decode holds already)
    skip: int = 0
    inflight: int = 0  # queued sends not yet reported done
    output: StepOutput | None = None  # the finished prefill output, held until the KV is sent
    finishing: bool = False  # last pages, Aux and Status are queued
    failed: bool = False
    nbytes: int = 0
    first_send_at: float | None = None
    last_progress: float = 0.0
    machine: RoomMachine | None = None  # the room's state and the bound of each (disagg/room.py)
    detached: bool = False  # vLLM's protocol: answer the client when computed, not when shipped
    answered: bool = False  # a detached room's output went to the client
    admitted: bool = False  # in the engine (its KV request came); before that it holds nothing


@dataclass
class _PageSend:
    """Tag of one queued page send: its room and the source pages it holds a reference to."""

    room: _Room
    pages: list[int]


class PrefillDisaggManager:
    """P/D bookkeeping of one prefill DP rank. Not thread-safe: call it from the engine thread."""

    def __init__(
        self,
        core: EngineCore,
        config: DisaggConfig,
        dp_rank: int,
        bootstrap_host: str = "127.0.0.1",
        bootstrap_port: int | None = None,
        register_rooms: bool = False,
        model: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.clock = clock  # the rooms' bounds run on it
        self.bounds = bounds(Side.PREFILL, config, PEER_GRACE_S)
        self.core = core
        self.scheduler = core.scheduler
        self.pool = core.kv_pool
        self.config = config
        self.rank = dp_rank
        self.model = model or model_id(core)
        self.register_rooms = register_rooms
        self.auth = PlaneAuth(config.secret)
        self.bootstrap = BootstrapClient(bootstrap_host, bootstrap_port or config.bootstrap_port, self.auth)
        self.inbox = Inbox()
        self.sender = create_sender(config.transfer_backend, self.pool, self.inbox.put, config.transfer_timeout,
                                    auth=self.auth, idle_timeout=config.idle_timeout, options=config.engine_options())
        self.sender.on_lost = self.inbox.put
        self.stats = TransferStats("prefill")
        self.rooms: dict[int, _Room] = {}
        self.by_rid: dict[str, _Room] = {}
        self.early: dict[int, tuple[m.KVRequest, float]] = {}  # KV requests ahead of their prefill request
        self.tombstones: dict[int, tuple[str, str, float, int]] = {}  # failed rooms: reason, cause, expiry, status
        self._released: list[tuple[StepOutput, DisaggMeta]] = []
        self._abort_meta: dict[str, DisaggMeta] = {}  # meta for abort outputs still to come
        self._answered_aborts: set[str] = set()  # detached rooms failed after answering: drop their abort output
        self._io = EventLoopThread(f"prefill-ctl-{dp_rank}")
        self._zmq = zmq.asyncio.Context()
        self._pull: zmq.asyncio.Socket | None = None
        self.info: m.RankInfo | None = None
        self.scheduler.on_prefill_progress = self._on_progress

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> m.RankInfo:
        """Bind the control socket and register this rank at the bootstrap service (bounded)."""
        self._pull = self._zmq.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, max_control_bytes(self.pool.num_pages))
        self._pull.bind(f"tcp://{self.config.host}:*")
        port = int(self._pull.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self._io.submit(self._receive())
        self.info = m.RankInfo(
            self.rank, self.config.host, port, self.pool.layout, self.model, self.config.transfer_backend, os.getpid()
        )
        deadline = time.monotonic() + self.config.bootstrap_timeout
        self._io.run(self.bootstrap.register_rank(self.info, deadline), self.config.bootstrap_timeout + 5)
        logger.info("prefill rank %d: control %s registered at bootstrap %s",
                    self.rank, self.info.control_endpoint, self.bootstrap.address)
        return self.info

    async def _receive(self) -> None:
        assert self._pull is not None
        while True:
            data = await self._pull.recv()
            try:
                self.inbox.put(m.CONTROL.decode(data, self.auth))
            except AuthError as e:
                self.stats.refusals.record(f"prefill rank {self.rank} control", "unauthenticated", str(e))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.stats.refusals.record(f"prefill rank {self.rank} control", "malformed", str(e))

    def close(self) -> None:
        async def shutdown() -> None:
            if self._pull is not None:
                self._pull.close(0)
            await self.bootstrap.close()

        try:
            self._io.run(shutdown(), 5.0)
        except Exception:  # closing anyway
            logger.debug("prefill rank %d: control shutdown incomplete", self.rank, exc_info=True)
        self._io.stop()
        self._zmq.term()
        self.sender.close()
        self.inbox.close()

    def fileno(self) -> int:
        """Readable when :meth:`process` has network events to apply."""
        return self.inbox.fileno()

    def timeout_s(self) -> float | None:
        """Longest the caller may wait before calling :meth:`process` again (None: until :meth:`fileno`)."""
        if self._released:
            return 0.0
        return IDLE_CHECK_S if (self.rooms or self.early or self.tombstones) else None

    def num_gated(self) -> int:
        """Prefill requests waiting for their decode's KV request outside the engine (they count as
        queued in the rank's load)."""
        return sum(1 for r in self.rooms.values() if not r.admitted and not r.failed)

    # ------------------------------------------------------------------ requests
    def add(self, req: Req, room: int, detached: bool = False) -> None:
        """Take a prefill request for ``room``. It enters the engine once decode's KV request for the
        room has come (at once if it already has); its KV is held after the first token until shipped.
        ``detached`` (vLLM's protocol, see the module): decode asks only after this half has answered, so
        it enters the engine at once and its output is released once computed, before the KV is shipped.
        What the engine would refuse is refused here, now (:class:`RequestError`)."""
        if room in self.rooms:
            raise RoomConflictError(f"bootstrap_room {room} is already active on prefill rank {self.rank}")
        req.stop_after_prefill = True
        self.core.validate(req)
        if req.rid in self.by_rid:
            raise RequestError(f"rid {req.rid!r} is already in use by a request waiting for its decode half")
        self.scheduler.ids.check_free(req.rid, req.num_samples)
        r = _Room(room, req.rid, req, time.monotonic(), detached=detached)
        r.machine = RoomMachine(Side.PREFILL, self.bounds, self.clock, State.WAITING_FOR_DECODE)
        self.rooms[room] = r
        self.by_rid[req.rid] = r
        if self.register_rooms:
            self._io.submit(self._register_room(room))
        tomb = self.tombstones.pop(room, None)
        if tomb is not None:
            self._fail(r, tomb[0], tomb[1], tomb[3])
            return
        if detached:  # decode asks only after this half answered: computing cannot wait for it
            self._admit(r)
            if r.failed:
                return
        early = self.early.pop(room, None)
        if early is not None:
            self._pair(r, early[0])

    async def _note_asked(self, ask: m.RoomAsk) -> None:
        """Tell the bootstrap service this rank lacks ``ask.room``: if another rank holds it, the front
        fails both halves at once (decode asked the wrong rank) instead of both waiting."""
        try:
            await self.bootstrap.note_asked(ask, time.monotonic() + 2.0)
        except Exception as e:
            logger.warning("prefill rank %d: could not report room %d to the bootstrap service: %s",
                           self.rank, ask.room, e)

    async def _register_room(self, room: int) -> None:
        try:
            await self.bootstrap.register_room(room, self.rank, time.monotonic() + self.config.bootstrap_timeout)
        except Exception as e:
            logger.warning("prefill rank %d: could not register room %d: %s", self.rank, room, e)

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        """Abort a request; a paired decode learns at once, and the KV is freed once no send reads it."""
        r = self.by_rid.get(rid)
        if r is None:
            return self.core.abort(rid, message)
        self._fail(r, message, m.Cause.PREFILL_ABORTED)
        return True

    def reject_room(self, room: int, reason: str, status: int = 0, cause: str = m.Cause.PREFILL_REJECTED) -> None:
        """The prefill request for ``room`` was refused before reaching :meth:`add`: answer the room's
        KV request with ``reason``, now or when it comes (tombstone). A room active here belongs to
        another request and is left alone; an existing tombstone keeps its reason."""
        if room in self.rooms or room in self.tombstones:
            return
        self.stats.record_failure(cause)
        early = self.early.pop(room, None)
        if early is not None:
            self._reply(early[0], m.Status(room, False, reason, cause, status))
        self._tombstone(room, reason, cause, status)

    # ------------------------------------------------------------------ engine loop
    def process(self, outputs: list[StepOutput]) -> tuple[list[StepOutput], dict[str, DisaggMeta]]:
        """Apply network events, hold back outputs whose KV is still being sent, release finished
        ones. Returns the outputs to deliver and P/D ``meta_info`` fields per rid among them."""
        for item in self.inbox.drain():
            if isinstance(item, SendResult):
                self._on_sent(item)
            elif isinstance(item, m.KVRequest):
                self._on_kv_request(item)
            elif isinstance(item, m.Abort):
                self._on_abort(item)
            elif isinstance(item, ReceiverLost):
                self._on_receiver_lost(item)
        result: list[StepOutput] = []
        meta: dict[str, DisaggMeta] = {}
        for out in outputs:
            r = self.by_rid.get(out.rid)
            if r is None and out.rid in self._answered_aborts:
                if out.finished:
                    self._answered_aborts.discard(out.rid)
                continue  # a detached room failed after its client had the answer
            if r is None:
                if out.finished and out.rid in self._abort_meta:
                    if (out.finish_reason or {}).get("type") != "abort":
                        # the room failed in this very call (an Abort drained above) after its step had
                        # finished the prompt: the request's abort output, with the reason, comes with
                        # the next step; this one must not tell the client its half succeeded
                        continue
                    meta[out.rid] = self._abort_meta.pop(out.rid)
                result.append(out)
                continue
            if r.answered:  # the client has its answer: later outputs (the abort of a failure) go nowhere
                if out.finished and (out.finish_reason or {}).get("type") == "abort":
                    self._answered_aborts.discard(out.rid)
                    if not r.failed:
                        self._fail(r, out.finish_reason.get("message", "aborted"), m.Cause.PREFILL_ABORTED)
                        self._answered_aborts.discard(out.rid)
                continue
            meta[out.rid] = self._meta(r)
            if not out.finished:
                result.append(out)
            elif (out.finish_reason or {}).get("type") == "abort":
                if not r.failed:  # aborted behind the manager's back
                    self._fail(r, out.finish_reason.get("message", "aborted"), m.Cause.PREFILL_ABORTED)
                self._abort_meta.pop(out.rid, None)
                result.append(out)
            else:
                r.output = out
                if r.detached and not r.answered:
                    r.answered = True
                    result.append(out)
                if r.kvreq is not None:
                    self._finish(r)
        self._check_timeouts(time.monotonic())
        for out, fields in self._released:
            result.append(out)
            meta[out.rid] = fields
        self._released.clear()
        return result, meta

    def metrics(self) -> DisaggReport:
        live = [r for r in self.rooms.values() if not r.failed]
        return self.stats.snapshot({
            "waiting_for_decode": sum(1 for r in live if r.machine.state is State.WAITING_FOR_DECODE),
            "waiting_for_prefill_request": len(self.early),
            "transferring": sum(1 for r in live if r.machine.state in (State.COMPUTING, State.SENDING)),
        })

    # ------------------------------------------------------------------ pairing
    def _on_kv_request(self, k: m.KVRequest) -> None:
        self._reply(k, m.Accepted(k.room, self.rank))
        r = self.rooms.get(k.room)
        refusal = self._refusal(k, r)
        if refusal is not None:
            reason, cause = refusal
            if r is not None and r.kvreq is None and cause != m.Cause.ROOM_CONFLICT:
                r.kvreq = k
                self._fail(r, reason, cause)
            else:
                self._reply(k, m.Status(k.room, False, reason, cause))
                self.stats.record_failure(cause)
                if r is None and cause != m.Cause.ROOM_CONFLICT:
                    self._tombstone(k.room, reason, cause)
            return
        tomb = self.tombstones.get(k.room)
        if tomb is not None:
            self._reply(k, m.Status(k.room, False, tomb[0], tomb[1], tomb[3]))
        elif r is None:
            self.early[k.room] = (k, time.monotonic() + self.config.waiting_timeout)
            self._io.submit(self._note_asked(m.RoomAsk(k.room, self.rank, k.decode_rank)))
        else:
            self._pair(r, k)

    def _refusal(self, k: m.KVRequest, r: _Room | None) -> tuple[str, str] | None:
        """Why this KV request cannot be served, with its cause, or None."""
        who = f"room {k.room} (prefill rank {self.rank}, decode rank {k.decode_rank})"
        if k.prefill_rank != self.rank:
            return f"{who}: KV request meant for prefill rank {k.prefill_rank} reached rank {self.rank}", m.Cause.TRANSFER_ERROR
        diff = self.pool.layout.mismatch(k.layout)
        if diff is None and k.model != self.model:
            diff = f"model differs: {self.model} vs {k.model}"
        if diff is None and k.receiver.backend != self.config.transfer_backend:
            diff = f"transfer backend differs: {self.config.transfer_backend} vs {k.receiver.backend}"
        if diff is not None:
            return f"{who}: KV layout mismatch between prefill and decode: {diff}", m.Cause.LAYOUT_MISMATCH
        if any(not 0 <= p < k.receiver.num_pages for p in k.dst_pages):
            return f"{who}: destination pages outside the decode pool [0, {k.receiver.num_pages})", m.Cause.TRANSFER_ERROR
        ps = self.pool.page_size
        if not 0 <= k.cached_tokens < k.num_tokens or k.cached_tokens % ps:
            return (f"{who}: decode claims {k.cached_tokens} cached tokens of a {k.num_tokens}-token prompt; "
                    f"whole pages of {ps} below the prompt length are allowed"), m.Cause.PROMPT_MISMATCH
        if len(k.dst_pages) != self.pool.pages_for(k.num_tokens) - k.cached_tokens // ps:
            return (f"{who}: {len(k.dst_pages)} destination pages for a {k.num_tokens}-token prompt of which "
                    f"decode holds {k.cached_tokens}"), m.Cause.PROMPT_MISMATCH
        other = r.kvreq if r is not None else self.early.get(k.room, (None,))[0]
        if other is not None:
            where = f"decode rank {other.decode_rank} at {other.receiver.address}"
            return f"{who}: the room is already paired with {where}", m.Cause.ROOM_CONFLICT
        return None

    def _pair(self, r: _Room, k: m.KVRequest) -> None:
        r.kvreq = k
        if k.num_tokens != len(r.req.input_ids) or k.prompt_hash != m.prompt_hash(r.req.input_ids):
            self._fail(r, f"room {r.room} (prefill rank {self.rank}, decode rank {k.decode_rank}): prefill and "
                       f"decode hold different prompts ({len(r.req.input_ids)} vs {k.num_tokens} tokens)",
                       m.Cause.PROMPT_MISMATCH)
            return
        skip = k.cached_tokens // self.pool.page_size
        hashes = page_hashes(r.req.input_ids, self.pool.page_size, skip)
        if skip and hashes[-1] != k.cached_hash:
            self._fail(r, f"room {r.room} (prefill rank {self.rank}, decode rank {k.decode_rank}): the page hash of "
                       f"the {k.cached_tokens} tokens decode says it holds does not match this prompt's",
                       m.Cause.PROMPT_MISMATCH)
            return
        r.pages_sent = r.skip = skip
        if not self._fire(r, Event.PAIRED):
            return
        if not r.admitted:
            self._admit(r)
        elif r.output is not None:  # a detached room computed before decode asked
            self._finish(r)
        elif r.req.state == ReqState.PREFILLING:
            self._ship(r, r.req.num_computed // self.pool.page_size)

    def _admit(self, r: _Room) -> None:
        """Decode has reserved the room's pages and asked for them: the prompt may be computed now."""
        try:
            self.scheduler.add_request(r.req)  # validated in add()
        except RequestError as e:  # its rid was taken meanwhile by a request without a room
            self._fail(r, f"room {r.room} (prefill rank {self.rank}): {e}", m.Cause.PREFILL_REJECTED, status=400)
            return
        r.admitted = True

    def _on_progress(self, req: Req, tokens_ready: int) -> None:
        r = self.by_rid.get(req.rid)
        if r is not None and r.kvreq is not None and not r.failed:
            self._ship(r, tokens_ready // self.pool.page_size)

    def _ship(self, r: _Room, upto: int) -> None:
        upto = min(upto, len(r.req.pages))
        if upto > r.pages_sent:
            assert r.kvreq is not None
            src = r.req.pages[r.pages_sent : upto]
            dst = r.kvreq.dst_pages[r.pages_sent - r.skip : upto - r.skip]
            self.core.runner.wait_kv_written()
            self._count_send(r)
            self.pool.ref(src)
            self.sender.send_pages(r.kvreq.receiver, r.room, src, dst, tag=_PageSend(r, src))
            r.pages_sent = upto

    def _finish(self, r: _Room) -> None:
        assert r.kvreq is not None and r.output is not None
        self._ship(r, len(r.req.pages))
        out = r.output
        first = out.new_token_ids[0] if out.new_token_ids else None
        aux = m.Aux(r.room, first, out.output_logprobs, out.cached_tokens, out.input_logprobs)
        for msg in (aux, m.Status(r.room, True)):
            self._count_send(r)
            self.sender.send_message(r.kvreq.receiver, msg, tag=r)
        r.finishing = True

    def _count_send(self, r: _Room) -> None:
        if not r.failed:
            self._fire(r, Event.SENDS_QUEUED)
        now = time.monotonic()
        if r.first_send_at is None:
            r.first_send_at = now
        if r.inflight == 0:
            r.last_progress = now
        r.inflight += 1

    def _reply(self, k: m.KVRequest, msg: m.StreamMsg) -> None:
        """A message to a decode receiver outside any room's accounting (tagged with its address: a
        receiver that cannot be reached is treated as lost)."""
        self.sender.send_message(k.receiver, msg, tag=k.receiver.address)

    # ------------------------------------------------------------------ completion and failure
    def _on_sent(self, res: SendResult) -> None:
        r = res.tag
        if isinstance(r, _PageSend):
            self.pool.unref(r.pages)
            r = r.room
        if not isinstance(r, _Room):
            if res.error and not res.cancelled:
                logger.warning("prefill rank %d: message for room %d not delivered: %s", self.rank, res.room, res.error)
                if isinstance(r, str):  # e.g. the Accepted of a KV request whose decode died right after sending it
                    self._on_receiver_lost(ReceiverLost(r, f"it cannot be reached: {res.error}"))
            return
        r.inflight -= 1
        if res.error and not res.cancelled and not r.failed:
            dst = r.kvreq.receiver.address if r.kvreq else "?"
            decode = r.kvreq.decode_rank if r.kvreq else "?"
            self._fail(r, f"room {r.room}: KV transfer from prefill rank {self.rank} to decode rank {decode} at "
                       f"{dst} failed: {res.error}", m.Cause.TRANSFER_ERROR)
        elif not res.error and not res.cancelled:
            r.nbytes += res.nbytes
            r.last_progress = res.done_at
            if not r.failed and self._fire(r, Event.DATA) and not r.inflight and not r.finishing:
                self._fire(r, Event.SENDS_DRAINED)  # the next chunk computes
        self._settle(r)

    def _settle(self, r: _Room) -> None:
        """Drop a room once nothing in flight reads its pages."""
        if r.inflight or not (r.failed or r.finishing):
            return
        if not r.failed and self._fire(r, Event.COMPLETED):
            self.scheduler.release(r.rid)
            if r.first_send_at is not None:
                self.stats.record_transfer(r.nbytes, r.last_progress - r.first_send_at)
            assert r.output is not None
            if not r.answered:
                self._released.append((r.output, self._meta(r)))
        self.rooms.pop(r.room, None)
        self.by_rid.pop(r.rid, None)

    def _fail(self, r: _Room, reason: str, cause: str, status: int = 0, tell_decode: bool = True) -> None:
        """Fail a room: stop its queued sends, abort the request (its abort output carries ``reason``;
        HTTP ``status``, else 503) and tell its decode (unless that receiver is gone); the pages
        become free when the last send in flight lets go of them."""
        if r.failed:
            return
        if not r.machine.done:
            r.machine.fire(Event.FAILED, cause, reason or cause)
        r.failed = True
        r.finishing = False
        r.output = None
        self.stats.record_failure(cause)
        logger.info("prefill rank %d: room %d failed (%s): %s", self.rank, r.room, cause, reason)
        self.sender.cancel(r.room)
        if not r.admitted:  # never reached the engine: its abort output is this manager's to give
            finish = {"type": "abort", "message": reason, "status_code": status or PD_FAILURE_STATUS}
            out = StepOutput(r.rid, [], finished=True, finish_reason=finish, prompt_tokens=len(r.req.input_ids))
            self._released.append((out, self._meta(r)))
        elif self.scheduler.abort(r.rid, reason, status_code=status or PD_FAILURE_STATUS):
            if r.answered:
                self._answered_aborts.add(r.rid)
            else:
                self._abort_meta[r.rid] = self._meta(r)
        if r.kvreq is not None:
            if tell_decode:
                self._count_send(r)
                self.sender.send_message(r.kvreq.receiver, m.Status(r.room, False, reason, cause, status), tag=r)
        else:
            self._tombstone(r.room, reason, cause, status)
        self._settle(r)

    def _fire(self, r: _Room, event: Event) -> bool:
        """Move the room's state machine (an event it does not allow fails the room); whether it lives on."""
        return r.machine.fire_or(event, lambda why: self._fail(r, f"room {r.room} (prefill rank {self.rank}): "
                                                               f"{why}", m.Cause.TRANSFER_ERROR))

    def _on_abort(self, a: m.Abort) -> None:
        reason = f"decode rank {a.decode_rank} aborted room {a.room}: {a.reason}"
        r = self.rooms.get(a.room)
        if r is not None:
            self._fail(r, reason, m.Cause.DECODE_ABORTED)
            return
        early = self.early.pop(a.room, None)
        if early is not None:  # confirm: nothing will be written for this room
            self._reply(early[0], m.Status(a.room, False, reason, m.Cause.DECODE_ABORTED))
        self._tombstone(a.room, reason, m.Cause.DECODE_ABORTED)

    def _on_receiver_lost(self, lost: ReceiverLost) -> None:
        """The decode receiver at ``lost.address`` is gone: fail every room bound to it now (their KV is
        freed once no send reads it), and answer its early KV requests' rooms with a tombstone."""
        for r in list(self.rooms.values()):
            k = r.kvreq
            if k is not None and not r.failed and k.receiver.address == lost.address:
                self._fail(r, f"room {r.room} (prefill rank {self.rank}, decode rank {k.decode_rank}): lost decode "
                           f"rank {k.decode_rank}'s KV receiver at {lost.address}: {lost.reason}; its KV was freed",
                           m.Cause.PEER_LOST)  # told on a new connection: a decode still alive learns at once
        for room, (k, _) in list(self.early.items()):
            if k.receiver.address == lost.address:
                del self.early[room]
                self.stats.record_failure(m.Cause.PEER_LOST)
                self._tombstone(room, f"room {room} (prefill rank {self.rank}, decode rank {k.decode_rank}): lost "
                                f"decode rank {k.decode_rank}'s KV receiver at {lost.address}: {lost.reason}",
                                m.Cause.PEER_LOST)

    def _tombstone(self, room: int, reason: str, cause: str, status: int = 0) -> None:
        self.tombstones[room] = (reason, cause, time.monotonic() + self.config.waiting_timeout, status)

    def _check_timeouts(self, now: float) -> None:
        cfg = self.config
        clock_now = self.clock()
        for r in list(self.rooms.values()):
            bound = r.machine.overdue(clock_now)
            if bound is None:
                continue
            state = r.machine.state
            if state is State.WAITING_FOR_DECODE:
                self._fail(r, f"no decode server sent a KV request for bootstrap_room {r.room} to prefill rank "
                           f"{self.rank} within {cfg.waiting_timeout:g} s ({bound.flag}); the prompt was not "
                           "computed (a prefill request waits for its decode half outside the engine)", bound.cause)
            elif state is State.SENDING:
                assert r.kvreq is not None
                self._fail(r, f"room {r.room}: KV transfer from prefill rank {self.rank} to decode rank "
                           f"{r.kvreq.decode_rank} at {r.kvreq.receiver.address} stalled for "
                           f"{cfg.transfer_timeout:g} s ({bound.flag})", bound.cause)
            else:  # COMPUTING: a backstop, decode's own bound normally aborts the room first
                assert r.kvreq is not None
                self._fail(r, f"room {r.room} (prefill rank {self.rank}, decode rank {r.kvreq.decode_rank}): the "
                           f"prompt was not computed and sent within {bound.seconds:g} s of the request's arrival "
                           f"({bound.flag}); its KV was freed", bound.cause)
        for room, (k, deadline) in list(self.early.items()):
            if now > deadline:
                del self.early[room]
                reason = (f"prefill rank {self.rank} received no prefill request for bootstrap_room {room} within "
                          f"{cfg.waiting_timeout:g} s of decode rank {k.decode_rank}'s KV request "
                          "(--disaggregation-waiting-timeout)")
                self.stats.record_failure(m.Cause.WAITING_TIMEOUT)
                self._reply(k, m.Status(room, False, reason, m.Cause.WAITING_TIMEOUT))
        for room, (_, _, expiry, _) in list(self.tombstones.items()):
            if now > expiry:
                del self.tombstones[room]

    def _meta(self, r: _Room) -> DisaggMeta:
        return DisaggMeta(
            bootstrap_room=r.room,
            prefill_dp_rank=self.rank,
            decode_dp_rank=r.kvreq.decode_rank if r.kvreq is not None else None,
            kv_transfer_bytes=r.nbytes,
            kv_transfer_ms=round((r.last_progress - r.first_send_at) * 1000, 3) if r.first_send_at else 0.0,
        )
