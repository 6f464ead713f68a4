"""The DP controller: spawns one worker process per rank and routes messages between them and the front.

It lives in the front's asyncio loop. Requests go out over one ZMQ PUSH socket per rank (sync
sockets with unbounded queues, so sending never blocks or awaits, which keeps aborts safe inside
``finally`` blocks); every worker's outputs come back on one PULL socket read by a background
task that hands each :class:`StepOutput` to the per-request asyncio queue of its
:class:`RequestHandle`. A watchdog task polls the worker processes: a dead rank fails its
in-flight requests with a 503 and makes the server unhealthy. The load a worker reports with
every output batch answers ``/get_load`` without a round trip.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from pdserve.disagg.stats import DisaggMeta
from pdserve.engine.request import StepOutput
from pdserve.server import messages as msg
from pdserve.server.config import ServerConfig
from pdserve.server.dispatch import NoRankAvailable, RankView, make_policy
from pdserve.server.errors import ServerError
from pdserve.server.kv_event_feed import KVEventFeed
from pdserve.server.metrics import ServerMetrics

WATCHDOG_INTERVAL_S = 0.2
SHUTDOWN_JOIN_S = 5.0
FLUSH_TIMEOUT_S = 30.0

logger = logging.getLogger("pdserve.controller")


@dataclass
class RequestHandle:
    """One in-flight request as the controller tracks it; the consumer reads ``queue``."""

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
    done: bool = False


@dataclass
class RankState:
    rank: int
    proc: subprocess.Popen | None = None
    sock: zmq.Socket | None = None
    ready: msg.WorkerReady | None = None
    alive: bool = True
    error: str | None = None
    load: msg.RankLoad = field(default_factory=msg.RankLoad)
    num_reqs: int = 0
    num_tokens: int = 0


class DPController:
    """Owns the worker processes and the sockets to them; used from one event loop."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.dp_size = config.dp_size
        self.policy = make_policy(config.load_balance_method, config.dp_size)
        self.ranks = [RankState(rank) for rank in range(config.dp_size)]
        self.requests: dict[str, RequestHandle] = {}
        self.rooms: dict[int, str] = {}  # P/D: bootstrap_room -> rid of the request in flight
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
        self.kv_events = KVEventFeed()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the sockets and spawn the workers; readiness arrives later (see :attr:`ready_event`)."""
        disagg = self.config.disagg
        if disagg.mode == "prefill":
            from pdserve.disagg.bootstrap import BootstrapServer

            self.bootstrap = await asyncio.to_thread(
                BootstrapServer(self.dp_size, self.config.host, disagg.bootstrap_port,
                                self.config.load_balance_method).start
            )
            disagg = replace(disagg, bootstrap_port=self.bootstrap.port)
            logger.info("P/D bootstrap service on %s", self.bootstrap.address)
        disagg = replace(disagg, host=self.config.host)
        self._tmpdir = tempfile.mkdtemp(prefix="pdserve-")
        self._sync_ctx = zmq.Context(1)
        self._async_ctx = zmq.asyncio.Context(1)
        out_addr = f"ipc://{self._tmpdir}/out"
        self._pull = self._async_ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(out_addr)
        threads = self.config.engine.torch_threads or max(1, len(os.sched_getaffinity(0)) // self.dp_size)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for state in self.ranks:
            in_addr = f"ipc://{self._tmpdir}/in{state.rank}"
            sock = self._sync_ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(in_addr)
            state.sock = sock
            spec = msg.WorkerSpec(
                dp_rank=state.rank,
                dp_size=self.dp_size,
                engine=replace(self.config.engine, torch_threads=threads, engines_per_device=self.dp_size),
                input_addr=in_addr,
                output_addr=out_addr,
                parent_pid=os.getpid(),
                log_level=self.config.log_level,
                disagg=disagg,
            )
            state.proc = subprocess.Popen(
                [sys.executable, "-m", "pdserve.server.worker", msg.encode_spec(spec)],
                env=env,
                stdin=subprocess.DEVNULL,
            )
            logger.info("started dp rank %d worker (pid %d, %d torch threads)", state.rank, state.proc.pid, threads)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="pdserve-recv"),
            asyncio.create_task(self._watchdog(), name="pdserve-watchdog"),
        ]

    async def shutdown(self) -> None:
        """Stop every worker (ask, then terminate, then kill), fail what is in flight, free the sockets."""
        self._closing = True
        for state in self.ranks:
            if state.alive and state.proc is not None and state.proc.poll() is None:
                self._send(state, msg.ShutdownReq())
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
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

    @property
    def ready(self) -> bool:
        return self.ready_event.is_set()

    @property
    def healthy(self) -> bool:
        return self.ready and not self._closing and all(s.alive for s in self.ranks)

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
        views = [RankView(s.rank, s.alive, s.num_reqs, s.num_tokens) for s in self.ranks]
        try:
            return self.policy.select(views, bootstrap_room)
        except NoRankAvailable as e:
            raise ServerError(503, str(e)) from None

    def submit(self, req: msg.GenerateReq) -> RequestHandle:
        """Send a request to ``req.dp_rank``; outputs then arrive on the returned handle's queue."""
        if not self.ready or self._closing:
            raise ServerError(503, "the server is not ready")
        state = self.ranks[req.dp_rank]
        if not state.alive:
            raise ServerError(503, f"DP rank {req.dp_rank} is not available: {state.error}")
        if req.rid in self.requests:
            raise ServerError(400, f"rid {req.rid!r} is already in use by a running request", "rid")
        room = req.bootstrap_room if self.config.disagg.mode != "null" else None
        if room is not None and room in self.rooms:
            raise ServerError(409, f"bootstrap_room {room} is already in use by running request {self.rooms[room]!r}",
                              "bootstrap_room")
        handle = RequestHandle(
            rid=req.rid,
            rank=req.dp_rank,
            prompt_tokens=len(req.input_ids),
            arrival=time.perf_counter(),
            num_tokens=len(req.input_ids),
            room=room,
        )
        if room is not None and self.bootstrap is not None and not self.bootstrap.follows_room:
            self.bootstrap.register_room(room, req.dp_rank)
        if not self._send(state, req):
            raise ServerError(503, f"DP rank {req.dp_rank} is not reachable")
        self.requests[req.rid] = handle
        if room is not None:
            self.rooms[room] = req.rid
        state.num_reqs += 1
        state.num_tokens += handle.num_tokens
        return handle

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        handle = self.requests.get(rid)
        if handle is None:
            return False
        self._send(self.ranks[handle.rank], msg.AbortReq(rid, message))
        return True

    def reject_room(self, room: int, rank: int | None, reason: str) -> None:
        """P/D prefill: the front refused a request naming ``room`` before it reached a worker. Tell
        the rank decode will ask (``rank``, else ``room % dp_size``; every rank when ``rank`` is out
        of range) so decode's KV request is answered with ``reason`` at once instead of waiting."""
        if self.config.disagg.mode != "prefill" or room in self.rooms:
            return  # a room in flight belongs to another request
        valid = rank is None or 0 <= rank < self.dp_size
        target = (room % self.dp_size) if rank is None or not valid else rank
        if self.bootstrap is not None and not self.bootstrap.follows_room:
            self.bootstrap.register_room(room, target)
        for state in self.ranks if not valid else [self.ranks[target]]:
            if state.alive:
                self._send(state, msg.RejectRoom(room, reason))

    def abort_all(self, message: str = "aborted by request") -> int:
        rids = list(self.requests)
        for rid in rids:
            self.abort(rid, message)
        return len(rids)

    def release(self, handle: RequestHandle) -> None:
        """The consumer is gone: stop queueing its outputs and abort it if still running."""
        if handle.done:
            return
        handle.detached = True
        if not self.abort(handle.rid, "client disconnected"):
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
            if not state.alive:
                return f"dp rank {state.rank} is not running"
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
        return [{"dp_rank": s.rank, **{k: getattr(s.load, k) for k in s.load.__struct_fields__}} for s in self.ranks]

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
                self._on_output(state, out, now)
            self._set_load(state, message.load)
        elif isinstance(message, msg.CacheEvents):
            self.kv_events.publish(message.dp_rank, message.events)
        elif isinstance(message, msg.DisaggStats):
            self.disagg_reports[message.dp_rank] = message.report
            if self.metrics is not None:
                self.metrics.set_disagg(message.dp_rank, message.report)
        elif isinstance(message, msg.ReqRejected):
            handle = self.requests.get(message.rid)
            if handle is not None:
                self._fail(handle, ServerError(message.status, message.message))
        elif isinstance(message, msg.FlushCacheDone):
            fut = self._flush_waiters.get((message.req_id, message.dp_rank))
            if fut is not None and not fut.done():
                fut.set_result(message)
        elif isinstance(message, msg.WorkerReady):
            self._on_ready(message)
        elif isinstance(message, msg.WorkerFailed):
            state = self.ranks[message.dp_rank]
            last_line = message.message.strip().splitlines()[-1] if message.message.strip() else "unknown error"
            state.error = last_line
            self._rank_died(state, f"DP rank {state.rank} failed: {last_line}")

    def _on_ready(self, message: msg.WorkerReady) -> None:
        state = self.ranks[message.dp_rank]
        state.ready = message
        self._set_load(state, message.load)
        logger.info("dp rank %d ready (pid %d, model %s)", message.dp_rank, message.pid, message.model_path)
        if all(s.ready is not None for s in self.ranks) and all(s.alive for s in self.ranks):
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
        self.requests.pop(handle.rid, None)
        if handle.room is not None and self.rooms.get(handle.room) == handle.rid:
            del self.rooms[handle.room]
        state = self.ranks[handle.rank]
        state.num_reqs -= 1
        state.num_tokens -= handle.num_tokens

    def _fail(self, handle: RequestHandle, error: ServerError) -> None:
        self._forget(handle)
        if not handle.detached:
            handle.queue.put_nowait(error)

    def _rank_died(self, state: RankState, reason: str) -> None:
        if not state.alive:
            return
        state.alive = False
        state.error = state.error or reason
        state.load = msg.RankLoad()
        logger.error("%s", reason)
        for handle in [h for h in self.requests.values() if h.rank == state.rank]:
            self._fail(handle, ServerError(503, reason))
        if not self.ready and not self._closing:
            self.startup_error = reason
            if self.on_fatal is not None:
                self.on_fatal(reason)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._closing:
                continue
            for state in self.ranks:
                code = state.proc.poll() if state.proc is not None else None
                if code is not None and state.alive:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    detail = f": {state.error}" if state.error else ""
                    self._rank_died(state, f"DP rank {state.rank} worker {how}{detail}")
