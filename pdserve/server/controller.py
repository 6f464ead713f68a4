"""The DP controller: spawns one worker process per rank and routes messages between them and the front.

It lives in the front's asyncio loop. Requests go out over one ZMQ PUSH socket per rank (sync
sockets with unbounded queues, so sending never blocks or awaits, which keeps aborts safe inside
``finally`` blocks); every worker's outputs come back on one PULL socket read by a background
task that hands each :class:`StepOutput` to the per-request asyncio queue of its
:class:`RequestHandle`. A watchdog task polls the worker processes: a rank that dies after startup
fails its in-flight requests with a 503 naming it and is restarted (exponential backoff, at most
``--worker-max-restarts`` times in a row) while the other ranks keep serving; the server is
healthy while at least one rank is ready. The load a worker reports with every output batch
answers ``/get_load`` without a round trip.

A prefill server's controller also runs the P/D bootstrap service (before the workers start, so
they can register), records room -> rank there when ranks are not ``room % dp_size``, and refuses
a ``bootstrap_room`` already in flight with 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from pdserve.cpu_threads import torch_threads_per_worker
from pdserve.disagg.auth import PlaneAuth
from pdserve.disagg.stats import DisaggMeta
from pdserve.engine.request import StepOutput, sample_rid
from pdserve.engine.request_ids import IdInUse, RequestIds, request_ids
from pdserve.plane_secret import SECRET_ENV
from pdserve.server import messages as msg
from pdserve.server.config import ServerConfig
from pdserve.server.dispatch import NoRankAvailable, RankView, make_policy
from pdserve.server.errors import ServerError
from pdserve.server.kv_event_feed import KVEventFeed
from pdserve.server.kv_events_config import default_topic
from pdserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from pdserve.disagg.messages import RoomAsk, RoomRefusal  # imports the KV layout (torch)

WATCHDOG_INTERVAL_S = 0.2
MAX_PREFILL_CLIENTS = 64  # P/D decode: bootstrap clients kept for telling prefill servers of refusals
REFUSAL_TIMEOUT_S = 2.0
MAX_REFUSED_ROOMS = 100_000  # P/D prefill: rooms decode refused before their prefill half came
RESTART_STREAK_RESET_S = 60.0  # a rank that served this long starts a fresh run of restarts
SHUTDOWN_JOIN_S = 5.0
FLUSH_TIMEOUT_S = 30.0

logger = logging.getLogger("pdserve.controller")


@dataclass
class RequestHandle:
    """One in-flight request as the controller tracks it; the consumer reads ``queue``.

    ``rid`` is the client's label (what answers echo and ``/abort_request`` names); ``iid`` is the
    internal id the worker knows it by, made by the controller and never reused."""

    rid: str
    rank: int
    prompt_tokens: int
    arrival: float
    queue: asyncio.Queue[StepOutput | ServerError] = field(default_factory=asyncio.Queue)
    num_tokens: int = 0  # prompt + generated, for token-based dispatch
    room: int | None = None  # P/D bootstrap_room
    disagg_meta: DisaggMeta | None = None  # P/D meta_info fields, as the worker last reported them
    first_token_at: float | None = None
    last_token_at: float | None = None
    detached: bool = False  # nobody reads the queue any more (client gone): drop outputs
    samples: list[str] = field(default_factory=list)  # internal ids of samples 1..n-1 (parallel sampling)
    done: bool = False
    iid: str = ""  # internal id (the worker's rid); the label's when not set
    batch: str | None = None  # the rid of the batch request this item belongs to (items are named rid-i)

    def __post_init__(self) -> None:
        self.iid = self.iid or self.rid


class RankPhase:
    """Lifecycle of one DP rank as ``/health`` and ``/get_load`` report it."""

    STARTING = "starting"  # first start, not ready yet
    READY = "ready"  # serving
    RESTARTING = "restarting"  # died; a new worker is (or will be, after the backoff) starting
    DOWN = "down"  # died more than --worker-max-restarts times in a row: given up


@dataclass
class RankState:
    rank: int
    proc: subprocess.Popen | None = None
    sock: zmq.Socket | None = None
    spec: msg.WorkerSpec | None = None
    ready: msg.WorkerReady | None = None
    phase: str = RankPhase.STARTING
    error: str | None = None  # why it last died
    restarts: int = 0  # restarts since startup
    streak: int = 0  # deaths in a row without serving RESTART_STREAK_RESET_S in between
    ready_at: float = 0.0
    generation: int = 0  # bumps at each restart: a fresh input socket per worker process
    restart_pending: bool = False  # its death is handled; the next worker is not spawned yet
    load: msg.RankLoad = field(default_factory=msg.RankLoad)
    num_reqs: int = 0
    num_tokens: int = 0

    @property
    def alive(self) -> bool:
        """Accepting requests (a starting rank counts, so startup can submit nothing but waits anyway)."""
        return self.phase in (RankPhase.READY, RankPhase.STARTING)

    def describe(self) -> dict[str, object]:
        return {"dp_rank": self.rank, "state": self.phase, "restarts": self.restarts,
                "pid": self.proc.pid if self.proc is not None and self.phase == RankPhase.READY else None,
                "error": self.error}


class DPController:
    """Owns the worker processes and the sockets to them; used from one event loop."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.dp_size = config.dp_size
        self.policy = make_policy(config.load_balance_method, config.dp_size)
        self.ranks = [RankState(rank) for rank in range(config.dp_size)]
        self.requests: dict[str, RequestHandle] = {}  # internal id -> handle, until the worker is done with it
        # the client's labels of live requests (rid and its samples' rid.sK), each held by an internal id
        self.ids = RequestIds()
        self.batches: dict[str, list[RequestHandle]] = {}  # a batch request's rid -> its items (named rid-i)
        self._next_iid = 0
        self.rooms: dict[int, str] = {}  # P/D: bootstrap_room -> internal id of the request in flight
        self.bootstrap = None  # BootstrapServer of a prefill server
        self.disagg_reports: dict[int, object] = {}  # rank -> latest DisaggReport
        self.ready_event = asyncio.Event()
        self.startup_error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None  # called when the server cannot start
        self._closing = False
        self._tmpdir: str | None = None
        self._sync_ctx: zmq.Context | None = None
        self._async_ctx: zmq.asyncio.Context | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._flush_waiters: dict[tuple[int, int], asyncio.Future[msg.FlushCacheDone]] = {}
        self._next_flush_id = 0
        self._env: dict[str, str] = {}
        self._plane_auth: PlaneAuth | None = None
        self._bootstrap_client: type | None = None  # P/D decode: BootstrapClient, to tell prefill servers
        self._prefill_clients: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._background: set[asyncio.Task] = set()
        self._refused_rooms: OrderedDict[int, tuple[RoomRefusal, float]] = OrderedDict()  # P/D prefill
        # P/D prefill: RejectRoom messages for ranks that were not ready, sent when they are: (message, expiry)
        self._held_rejections: OrderedDict[tuple[int, int], tuple[msg.RejectRoom, float]] = OrderedDict()
        self.kv_events = KVEventFeed()
        self.kv_publisher = None  # ZmqKVEventPublisher with --kv-events-config (vLLM's wire format)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the sockets and spawn the workers; readiness arrives later (see :attr:`ready_event`)."""
        disagg = self.config.disagg
        if disagg.mode == "prefill":
            from pdserve.disagg.bootstrap import BootstrapServer

            self.bootstrap = await asyncio.to_thread(
                BootstrapServer(self.dp_size, self.config.host, disagg.bootstrap_port,
                                self.config.load_balance_method, PlaneAuth(disagg.secret),
                                refusals=self.metrics.refusals if self.metrics is not None else None,
                                refusal_ttl_s=disagg.waiting_timeout).start
            )
            disagg = replace(disagg, bootstrap_port=self.bootstrap.port)
            loop = asyncio.get_running_loop()
            self.bootstrap.on_misroute = lambda *a: loop.call_soon_threadsafe(self._on_misroute, *a)
            self.bootstrap.on_refusal = lambda r: loop.call_soon_threadsafe(self._on_refusal, r)
            logger.info("P/D bootstrap service on %s", self.bootstrap.address)
        elif disagg.mode == "decode":
            from pdserve.disagg.bootstrap import BootstrapClient

            self._bootstrap_client = BootstrapClient  # imported now: it pulls in the wire types (and torch)
        if disagg.mode != "null" and not disagg.secret:
            logger.warning("P/D plane of this server is NOT authenticated: no --disaggregation-secret, "
                           "$%s or --api-key (acceptable on loopback only)", SECRET_ENV)
        secret = disagg.secret
        self._plane_auth = PlaneAuth(secret)
        disagg = replace(disagg, host=self.config.host, secret=None)  # the spec is a command line: secret via env
        events = self.config.kv_events
        if events is not None and events.enabled:
            from pdserve.server.kv_event_publisher import ZmqKVEventPublisher

            cfg = self.config
            model = cfg.served_model_name or os.path.basename(cfg.engine.model_path or "") or "model"
            topic = events.topic if events.topic is not None else default_topic(cfg.host, model)
            self.kv_publisher = await asyncio.to_thread(
                ZmqKVEventPublisher, events, self.dp_size, topic, cfg.prefix_caching_hash_algo, cfg.engine.page_size)
            if self.metrics is not None:
                self.metrics.kv_publisher = self.kv_publisher
        self._tmpdir = tempfile.mkdtemp(prefix="pdserve-")
        self._sync_ctx = zmq.Context(1)
        self._async_ctx = zmq.asyncio.Context(1)
        out_addr = f"ipc://{self._tmpdir}/out"
        self._pull = self._async_ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(out_addr)
        threads = self.config.engine.torch_threads or torch_threads_per_worker(self.dp_size)
        logger.info("%d torch thread(s) per DP rank (%s)", threads,
                    "--torch-threads" if self.config.engine.torch_threads else "one core left to the front")
        self._env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self._env.pop(SECRET_ENV, None)
        if secret:
            self._env[SECRET_ENV] = secret
        for state in self.ranks:
            state.spec = msg.WorkerSpec(
                dp_rank=state.rank,
                dp_size=self.dp_size,
                engine=replace(self.config.engine, torch_threads=threads, engines_per_device=self.dp_size),
                input_addr="",
                output_addr=out_addr,
                parent_pid=os.getpid(),
                log_level=self.config.log_level,
                disagg=disagg,
            )
        if self.config.engine.simulate:  # sim ranks compute nothing: one process holds them all (pdserve.sim.host)
            self._spawn_process(self.ranks, "pdserve.sim.host")
        else:
            for state in self.ranks:
                self._spawn(state)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="pdserve-recv"),
            asyncio.create_task(self._watchdog(), name="pdserve-watchdog"),
        ]

    def _spawn(self, state: RankState) -> None:
        """Start (or restart) the worker process of one rank, on a fresh input socket (a restarted
        simulated rank runs in a sim host process of its own)."""
        self._spawn_process([state], "pdserve.sim.host" if self.config.engine.simulate else "pdserve.server.worker")

    def _spawn_process(self, states: list[RankState], module: str) -> None:
        """Start ``python -m module SPEC...`` serving ``states``, each on a fresh input socket."""
        assert self._sync_ctx is not None
        specs = []
        for state in states:
            assert state.spec is not None
            if state.sock is not None:
                state.sock.close(0)  # messages queued for the dead worker must not reach its successor
            state.generation += 1
            in_addr = f"ipc://{self._tmpdir}/in{state.rank}.{state.generation}"
            sock = self._sync_ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(in_addr)
            state.sock = sock
            state.spec = msgspec.structs.replace(state.spec, input_addr=in_addr)
            specs.append(msg.encode_spec(state.spec))
        proc = subprocess.Popen([sys.executable, "-m", module, *specs], env=self._env, stdin=subprocess.DEVNULL)
        for state in states:
            state.proc = proc
        logger.info("started dp rank(s) %s in %s (pid %d)", ",".join(str(s.rank) for s in states), module, proc.pid)

    async def shutdown(self) -> None:
        """Stop every worker (ask, then terminate, then kill), fail what is in flight, free the sockets."""
        self._closing = True
        for state in self.ranks:
            if state.proc is None or state.proc.poll() is not None:
                continue
            if state.alive and state.phase == RankPhase.READY:
                self._send(state, msg.ShutdownReq())
            else:  # still loading: it holds no request and may not read its socket yet, so stop it now
                state.proc.terminate()
        deadline = time.monotonic() + SHUTDOWN_JOIN_S
        for state in self.ranks:
            proc = state.proc
            if proc is None:
                continue
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                logger.warning("dp rank %d did not exit, terminating pid %d", state.rank, proc.pid)
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
        for handle in list(self.requests.values()):
            self._fail(handle, ServerError(503, "the server is shutting down"))
        for client in self._prefill_clients.values():
            await client.close()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for state in self.ranks:
            if state.sock is not None:
                state.sock.close(0)
        if self._pull is not None:
            self._pull.close(0)
        if self._sync_ctx is not None:
            self._sync_ctx.term()
        if self._async_ctx is not None:
            self._async_ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self.bootstrap is not None:
            await asyncio.to_thread(self.bootstrap.stop)
        if self.kv_publisher is not None:
            await asyncio.to_thread(self.kv_publisher.close)

    @property
    def ready(self) -> bool:
        return self.ready_event.is_set()

    @property
    def healthy(self) -> bool:
        """Started, not stopping, and at least one rank serving."""
        return self.ready and not self._closing and any(s.phase == RankPhase.READY for s in self.ranks)

    def rank_states(self) -> list[dict[str, object]]:
        return [s.describe() for s in self.ranks]

    @property
    def info(self) -> msg.WorkerReady:
        """What rank 0 reported at startup (all ranks run the same engine config)."""
        ready = self.ranks[0].ready
        if ready is None:
            raise ServerError(503, "the server is still starting")
        return ready

    # ------------------------------------------------------------------ requests
    def pick_rank(self, pinned: int | None, bootstrap_room: int | None) -> int:
        if pinned is not None:
            return pinned
        views = [RankView(s.rank, s.phase == RankPhase.READY, s.num_reqs, s.num_tokens) for s in self.ranks]
        try:
            return self.policy.select(views, bootstrap_room)
        except NoRankAvailable as e:
            raise ServerError(503, str(e)) from None

    def new_iid(self) -> str:
        """A fresh internal id. Workers know requests only by these: a client's rid is a label, so
        no client rid (nor a sample's ``rid.sK`` or a batch item's ``rid-i``) can ever collide
        with another request's id in a worker, and a rid aborted by its client can be reused at once
        while the worker still finishes the old request."""
        self._next_iid += 1
        return f"#{self._next_iid}"

    def submit(self, req: msg.GenerateReq, num_samples: int = 1) -> RequestHandle:
        """Send a request to ``req.dp_rank``; outputs then arrive on the returned handle's queue.
        Its rid (a label) and the labels of its ``num_samples - 1`` further samples are reserved
        together: a request naming a label that a live request or sample holds is refused (400
        naming ``rid``). The worker gets the request under a fresh internal id."""
        if not self.ready or self._closing:
            raise ServerError(503, "the server is not ready")
        state = self.ranks[req.dp_rank]
        if state.phase != RankPhase.READY:
            raise ServerError(503, self.rank_unavailable(state))
        try:
            self.ids.check_free(req.rid, num_samples)
        except IdInUse as e:
            raise ServerError(400, str(e), "rid") from None
        room = req.bootstrap_room if self.config.disagg.mode != "null" else None
        refusal = self._refused_rooms.pop(room, None) if room is not None else None
        if refusal is not None and refusal[0].room == room and refusal[1] > time.monotonic():
            raise ServerError(refusal[0].status, refusal[0].reason)
        if room is not None and room in self.rooms:
            holder = self.requests.get(self.rooms[room])
            raise ServerError(409, f"bootstrap_room {room} is already in use by running request "
                                   f"{holder.rid if holder is not None else self.rooms[room]!r}",
                              "bootstrap_room")
        iid = self.new_iid()
        handle = RequestHandle(
            rid=req.rid,
            iid=iid,
            rank=req.dp_rank,
            prompt_tokens=len(req.input_ids),
            arrival=time.perf_counter(),
            num_tokens=len(req.input_ids),
            room=room,
        )
        if room is not None and self.bootstrap is not None:
            self.bootstrap.register_room(room, req.dp_rank)  # also lets the service catch a decode asking another rank
            self.bootstrap.clear_refusal(room)  # refused before (say, its rank was restarting), accepted now
        if not self._send(state, msgspec.structs.replace(req, rid=iid, label=req.rid)):
            raise ServerError(503, f"DP rank {req.dp_rank} is not reachable")
        self.ids.reserve(req.rid, num_samples, request_ids(iid, num_samples))
        self.requests[iid] = handle
        if room is not None:
            self.rooms[room] = iid
        state.num_reqs += 1
        state.num_tokens += handle.num_tokens
        return handle

    def rank_unavailable(self, state: RankState) -> str:
        """Why ``state`` takes no request now (a retryable 503: the rank comes back or others serve)."""
        if state.phase == RankPhase.DOWN:
            return (f"DP rank {state.rank} is down: its worker died {state.streak} times in a row "
                    f"(--worker-max-restarts {self.config.worker_max_restarts}); last: {state.error}")
        if state.phase == RankPhase.RESTARTING:
            return f"DP rank {state.rank} is restarting after its worker died: {state.error}"
        return f"DP rank {state.rank} is starting"
    def submit_samples(self, req: msg.GenerateReq) -> list[RequestHandle]:
        """Like :meth:`submit`, plus one handle per further sample when ``n`` > 1 (the worker forks
        them after the prompt's KV is computed; see ``Scheduler._fork_samples``)."""
        parent = self.submit(req, req.sampling_params.n)
        handles = [parent]
        for i in range(1, req.sampling_params.n):
            handle = RequestHandle(rid=sample_rid(req.rid, i), iid=sample_rid(parent.iid, i), rank=parent.rank,
                                   prompt_tokens=len(req.input_ids), arrival=parent.arrival,
                                   num_tokens=len(req.input_ids))
            self.requests[handle.iid] = handle
            state = self.ranks[parent.rank]
            state.num_reqs += 1
            state.num_tokens += handle.num_tokens
            parent.samples.append(handle.iid)
            handles.append(handle)
        return handles

    def group_batch(self, rid: str, handles: list[RequestHandle]) -> None:
        """The items of one batch request (named ``rid-i``): ``/abort_request`` with ``rid`` aborts
        them, and only them (never another request whose own rid merely starts with ``rid-``)."""
        for handle in handles:
            handle.batch = rid
        self.batches[rid] = handles

    def abort(self, rid: str, message: str = "aborted by request") -> int:
        """Abort what the client calls ``rid``: the live request (or sample) with that label, else
        the live items of the batch request with that rid. Their labels are free at once (a retry
        may reuse the rid right away: the worker finishes the old internal ids on its own). How many
        were aborted."""
        iid = self.ids.token(rid)
        handle = self.requests.get(iid) if iid is not None else None
        if handle is not None:
            return int(self._abort(handle, message))
        return sum(self._abort(item, message) for item in self.batches.get(rid, ()))

    def _abort(self, handle: RequestHandle, message: str) -> bool:
        """Tell the worker to abort ``handle``'s internal id and free its label; False if it is done."""
        if handle.done:
            return False
        self._send(self.ranks[handle.rank], msg.AbortReq(handle.iid, message))
        self._release_label(handle)
        return True

    def _release_label(self, handle: RequestHandle) -> None:
        self.ids.release(handle.rid, handle.iid)
        if handle.batch is not None:
            items = self.batches.get(handle.batch)
            if items is not None and all(self.ids.token(item.rid) != item.iid for item in items):
                del self.batches[handle.batch]

    def reject_room(self, room: int, rank: int | None, reason: str, status: int = 0) -> None:
        """P/D prefill: the front refused a request naming ``room`` before it reached a worker. Tell
        the rank decode will ask (``rank``, else ``room % dp_size``; every rank when ``rank`` is out
        of range) so decode's KV request is answered with ``reason`` at once instead of waiting."""
        if self.config.disagg.mode != "prefill" or room in self.rooms:
            return  # a room in flight belongs to another request
        valid = rank is None or 0 <= rank < self.dp_size
        target = (room % self.dp_size) if rank is None or not valid else rank
        if self.bootstrap is not None:
            from pdserve.disagg.messages import RoomRefusal

            if not self.bootstrap.follows_room:
                self.bootstrap.register_room(room, target)
            # a decode still resolving the rank (say, one that is restarting) learns it from the service
            self.bootstrap.refuse_room(RoomRefusal(room, reason, status or 503))
        expiry = time.monotonic() + self.config.disagg.waiting_timeout
        for state in self.ranks if not valid else [self.ranks[target]]:
            rejection = msg.RejectRoom(room, reason, status)
            if state.phase == RankPhase.READY:
                self._send(state, rejection)
            elif state.phase != RankPhase.DOWN:  # its next worker gets it once ready
                held = self._held_rejections
                held[(state.rank, room)] = (rejection, expiry)
                while held and (len(held) > MAX_REFUSED_ROOMS or next(iter(held.values()))[1] < time.monotonic()):
                    held.popitem(last=False)

    def tell_prefill(self, host: str, port: int, room: int, reason: str, status: int) -> None:
        """P/D decode: the front refused a request naming ``room`` before it reached a worker; tell the
        prefill server's bootstrap service so its half fails now (best effort, bounded)."""
        if self._bootstrap_client is None or self._closing:
            return
        from pdserve.disagg.messages import RoomRefusal

        client = self._prefill_clients.get((host, port))
        if client is None:
            client = self._prefill_clients[(host, port)] = self._bootstrap_client(host, port, self._plane_auth)
            if len(self._prefill_clients) > MAX_PREFILL_CLIENTS:
                _, old = self._prefill_clients.popitem(last=False)
                self._spawn_task(old.close())
        self._prefill_clients.move_to_end((host, port))

        async def tell() -> None:
            try:
                await client.refuse_room(RoomRefusal(room, reason, status), time.monotonic() + REFUSAL_TIMEOUT_S)
            except Exception as e:
                logger.info("could not tell the prefill server at %s:%d that room %d was refused: %s",
                            host, port, room, e)

        self._spawn_task(tell())

    def _spawn_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_misroute(self, room: int, holder: int, ask: RoomAsk) -> None:
        """P/D prefill: rank ``holder`` runs the room's prefill request while decode sent its KV request
        to rank ``ask.rank``: both halves would wait for the waiting timeout. Fail both now (400: the
        two halves were pinned to different ranks)."""
        reason = (f"prefill rank {holder} holds bootstrap_room {room}; decode rank {ask.decode_rank} asked prefill "
                  f"rank {ask.rank} (pin both halves to the same prefill rank: disagg_prefill_dp_rank)")
        logger.info("%s", reason)
        rid = self.rooms.get(room)
        handle = self.requests.get(rid) if rid is not None else None
        if handle is not None and handle.rank == holder:
            self._send(self.ranks[holder], msg.AbortReq(handle.iid, reason))
            self._fail(handle, ServerError(400, reason, "disagg_prefill_dp_rank"))
        asked = self.ranks[ask.rank]
        if asked.phase == RankPhase.READY:
            self._send(asked, msg.RejectRoom(room, reason, 400, "wrong_rank"))

    def _on_refusal(self, refusal: RoomRefusal) -> None:
        """P/D prefill: decode refused its half of a room (or gave up on it before reaching a prefill
        rank). Fail the prefill half now, or refuse it when it comes (for the waiting timeout)."""
        rid = self.rooms.get(refusal.room)
        handle = self.requests.get(rid) if rid is not None else None
        if handle is not None:
            self._send(self.ranks[handle.rank], msg.AbortReq(handle.iid, refusal.reason))
            self._fail(handle, ServerError(refusal.status, refusal.reason))
            return
        refused = self._refused_rooms
        if refusal.room in refused:
            return  # the first reason is the most precise (the decode worker's, then its front's)
        refused[refusal.room] = (refusal, time.monotonic() + self.config.disagg.waiting_timeout)
        refused.move_to_end(refusal.room)
        now = time.monotonic()
        while refused and (len(refused) > MAX_REFUSED_ROOMS or next(iter(refused.values()))[1] < now):
            refused.popitem(last=False)

    def abort_all(self, message: str = "aborted by request") -> int:
        handles = list(self.requests.values())
        for handle in handles:
            self._abort(handle, message)
        return len(handles)

    def release(self, handle: RequestHandle) -> None:
        """The consumer is gone: stop queueing its outputs and abort it if still running."""
        if handle.done:
            return
        handle.detached = True
        if not self._abort(handle, "client disconnected"):
            return
        while not handle.queue.empty():
            handle.queue.get_nowait()

    async def flush_cache(self) -> str | None:
        """Empty every rank's prefix cache; None on success, else why not (naming the ranks)."""
        self._next_flush_id += 1
        flush_id = self._next_flush_id
        loop = asyncio.get_running_loop()
        waiters = []
        for state in self.ranks:
            if state.phase != RankPhase.READY:
                return f"dp rank {state.rank} is {state.phase}"
            fut: asyncio.Future[msg.FlushCacheDone] = loop.create_future()
            self._flush_waiters[(flush_id, state.rank)] = fut
            waiters.append(fut)
            self._send(state, msg.FlushCacheReq(flush_id))
        try:
            results = await asyncio.wait_for(asyncio.gather(*waiters), FLUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"a rank did not answer within {FLUSH_TIMEOUT_S:g} s"
        finally:
            for state in self.ranks:
                self._flush_waiters.pop((flush_id, state.rank), None)
        refusals = [f"dp rank {r.dp_rank}: {r.message}" for r in results if not r.success]
        return "; ".join(refusals) or None

    def loads(self) -> list[dict[str, int]]:
        """The load each rank reported with its latest outputs (SGLang's /get_load shape)."""
        return [{"dp_rank": s.rank, **{k: getattr(s.load, k) for k in s.load.__struct_fields__},
                 "state": s.phase, "restarts": s.restarts} for s in self.ranks]

    # ------------------------------------------------------------------ internals
    def _send(self, state: RankState, message: msg.ToWorker) -> bool:
        if state.sock is None:
            return False
        try:
            state.sock.send(msg.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("cannot send to dp rank %d: %s", state.rank, e)
            return False
        return True

    async def _recv_loop(self) -> None:
        assert self._pull is not None
        while True:
            data = await self._pull.recv()
            try:
                self._on_message(msg.decode_from_worker(data))
            except Exception:
                logger.exception("bad message from a worker")

    def _on_message(self, message: msg.FromWorker) -> None:
        if isinstance(message, msg.OutputBatch):
            state = self.ranks[message.dp_rank]
            now = time.perf_counter()
            for out in message.outputs:
                meta = message.disagg_meta.get(out.rid)
                if meta is not None and (handle := self.requests.get(out.rid)) is not None:
                    handle.disagg_meta = meta
                    for sample in filter(None, map(self.requests.get, handle.samples)):
                        sample.disagg_meta = meta  # forked from the same prefilled prompt: same room and ranks
                self._on_output(state, out, now)
            if state.phase == RankPhase.READY:  # not a dead worker's last batch
                self._set_load(state, message.load)
        elif isinstance(message, msg.CacheEvents):
            self.kv_events.publish(message.dp_rank, message.events)
            if self.kv_publisher is not None:
                self.kv_publisher.publish(message.dp_rank, message.events)
        elif isinstance(message, msg.DisaggStats):
            self.disagg_reports[message.dp_rank] = message.report
            if self.metrics is not None:
                self.metrics.set_disagg(message.dp_rank, message.report)
        elif isinstance(message, msg.ReqRejected):
            handle = self.requests.get(message.rid)
            if handle is not None:
                for rid in [message.rid, *handle.samples]:
                    if (sample := self.requests.get(rid)) is not None:
                        self._fail(sample, ServerError(message.status, message.message))
        elif isinstance(message, msg.FlushCacheDone):
            fut = self._flush_waiters.get((message.req_id, message.dp_rank))
            if fut is not None and not fut.done():
                fut.set_result(message)
        elif isinstance(message, msg.WorkerReady):
            self._on_ready(message)
        elif isinstance(message, msg.WorkerFailed):
            state = self.ranks[message.dp_rank]
            last_line = message.message.strip().splitlines()[-1] if message.message.strip() else "unknown error"
            self._rank_died(state, f"DP rank {state.rank} worker failed: {last_line}")

    def _on_ready(self, message: msg.WorkerReady) -> None:
        state = self.ranks[message.dp_rank]
        if state.proc is None or message.pid != state.proc.pid or state.phase == RankPhase.DOWN:
            return  # a worker that has died since
        state.ready = message
        state.phase = RankPhase.READY
        state.ready_at = time.monotonic()
        self._set_load(state, message.load)
        logger.info("dp rank %d ready (pid %d, model %s)", message.dp_rank, message.pid, message.model_path)
        now = time.monotonic()
        for key in [k for k in self._held_rejections if k[0] == state.rank]:
            rejection, expiry = self._held_rejections.pop(key)
            if expiry > now:
                self._send(state, rejection)
        if all(s.phase == RankPhase.READY for s in self.ranks):
            self.ready_event.set()

    def _on_output(self, state: RankState, out: StepOutput, now: float) -> None:
        handle = self.requests.get(out.rid)
        if handle is None:
            return
        num_new = len(out.new_token_ids)
        if num_new:
            handle.num_tokens += num_new
            state.num_tokens += num_new
            if self.metrics is not None:
                self.metrics.on_tokens(num_new, handle.first_token_at is None, handle.arrival, handle.last_token_at, now)
            if handle.first_token_at is None:
                handle.first_token_at = now
            handle.last_token_at = now
        if out.finished:
            if self.metrics is not None:
                self.metrics.on_finish(handle.prompt_tokens, handle.arrival, now)
            self._forget(handle)
        if not handle.detached:
            handle.queue.put_nowait(out)

    def _set_load(self, state: RankState, load: msg.RankLoad) -> None:
        state.load = load
        if self.metrics is not None:
            self.metrics.set_load(state.rank, load)

    def _forget(self, handle: RequestHandle) -> None:
        if handle.done:
            return
        handle.done = True
        self.requests.pop(handle.iid, None)
        self._release_label(handle)
        if handle.room is not None and self.rooms.get(handle.room) == handle.iid:
            del self.rooms[handle.room]
        state = self.ranks[handle.rank]
        state.num_reqs -= 1
        state.num_tokens -= handle.num_tokens

    def _fail(self, handle: RequestHandle, error: ServerError) -> None:
        self._forget(handle)
        if not handle.detached:
            handle.queue.put_nowait(error)

    def _rank_died(self, state: RankState, reason: str) -> None:
        """A worker process is gone: fail its requests; at startup the server fails, later the rank
        is restarted after a backoff (or marked down once it died too often in a row)."""
        if state.phase == RankPhase.DOWN or state.restart_pending:
            return  # already handled (the watchdog and WorkerFailed both report a death)
        was_ready = state.phase == RankPhase.READY
        if was_ready and self.kv_publisher is not None:
            self.kv_publisher.rank_reset(state.rank)  # its cache is gone with it
        state.error = reason
        state.load = msg.RankLoad()
        if self.metrics is not None:
            self.metrics.set_load(state.rank, state.load)
        for handle in [h for h in self.requests.values() if h.rank == state.rank]:
            self._fail(handle, ServerError(503, f"{reason}; the request was lost with it (retry it)"))
        if self.bootstrap is not None:
            self.bootstrap.unregister_rank(state.rank, reason)
        if not self.ready or self._closing:
            state.phase = RankPhase.DOWN
            logger.error("%s", reason)
            if not self.ready and not self._closing:
                self.startup_error = reason
                if self.on_fatal is not None:
                    self.on_fatal(reason)
            return
        if was_ready and time.monotonic() - state.ready_at > RESTART_STREAK_RESET_S:
            state.streak = 0
        state.streak += 1
        cfg = self.config
        if state.streak > cfg.worker_max_restarts:
            state.phase = RankPhase.DOWN
            if self.bootstrap is not None:
                self.bootstrap.unregister_rank(state.rank, self.rank_unavailable(state), gone=True)
            logger.error("%s; not restarting it: it died %d times in a row (--worker-max-restarts %d)",
                         reason, state.streak, cfg.worker_max_restarts)
            return
        state.phase = RankPhase.RESTARTING
        state.restart_pending = True
        delay = min(cfg.worker_restart_backoff_s * 2 ** (state.streak - 1), cfg.worker_restart_backoff_max_s)
        logger.error("%s; restarting it in %.2g s (restart %d of at most %d in a row)", reason, delay, state.streak,
                     cfg.worker_max_restarts)
        self._tasks.append(asyncio.create_task(self._restart(state, delay), name=f"pdserve-restart-{state.rank}"))

    async def _restart(self, state: RankState, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing or state.phase != RankPhase.RESTARTING:
            return
        if state.proc is not None and state.proc.poll() is None:
            state.proc.kill()  # a worker that reported failure but lingers
        if state.proc is not None:
            await asyncio.to_thread(state.proc.wait)
        state.restarts += 1
        self._spawn(state)
        state.restart_pending = False  # a successor that dies before it is ready counts as a death in a row

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._closing:
                continue
            for state in self.ranks:
                if state.phase == RankPhase.DOWN or state.restart_pending or state.proc is None:
                    continue
                code = state.proc.poll()
                if code is not None:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    self._rank_died(state, f"DP rank {state.rank} worker (pid {state.proc.pid}) {how}")
