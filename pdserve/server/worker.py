"""One DP rank as its own process: an :class:`EngineCore` driven by messages from the front.

Started by the controller as ``python -m pdserve.server.worker SPEC_JSON``. The loop blocks on
its input socket (and the P/D manager's events) while the engine has nothing runnable — idle, or
everything queued waits for pages (with a poll timeout, to notice a dead parent), otherwise
drains all pending messages without blocking and runs one engine step, sending that step's
outputs back in one :class:`OutputBatch` together with the rank's load.

In a P/D role the rank also owns a prefill or decode manager (:mod:`pdserve.disagg`): requests
with a ``bootstrap_room`` go through it, the loop also wakes on its network events, and every
step's outputs pass through ``manager.process`` (prefill holds a finished output back until its
KV is sent; decode activates requests whose KV arrived).

A request with a grammar is checked against the limits at once, then its grammar is compiled on the
rank's grammar thread (:class:`~pdserve.engine.grammar.CompileThread`), never on the loop: the
request enters the engine when its matcher is ready (an abort meanwhile is applied right then), and
other requests keep stepping while it compiles.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import replace

import zmq

from pdserve.engine.config import EngineConfig
from pdserve.server import messages as msg

IDLE_POLL_MS = 200
DISAGG_STATS_INTERVAL_S = 0.5

logger = logging.getLogger("pdserve.worker")


class Worker:
    """Owns the engine and the two sockets of one rank; not thread-safe (single loop)."""

    def __init__(self, spec: msg.WorkerSpec) -> None:
        self.spec = spec
        self.rank = spec.dp_rank
        self.ctx = zmq.Context(1)
        self.inbox = self.ctx.socket(zmq.PULL)
        self.outbox = self.ctx.socket(zmq.PUSH)
        for sock in (self.inbox, self.outbox):
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self.inbox.connect(spec.input_addr)
        self.outbox.connect(spec.output_addr)
        self.engine = None
        self.disagg = None  # PrefillDisaggManager | DecodeDisaggManager in a P/D role
        self._step_due = False  # an abort was handled: step once so its output goes out
        self._stats_sent: tuple[float, object] = (0.0, None)
        self._load_sent: msg.RankLoad | None = None
        self.faults = None  # pdserve.sim.faults.FaultInjector when --inject-faults is set
        self._poller = zmq.Poller()
        self._poller.register(self.inbox, zmq.POLLIN)
        self.grammars = None  # CompileThread, started by the first request with a grammar
        self._compiling: dict[str, tuple[msg.GenerateReq, object]] = {}  # rid -> its request, grammar compiling
        self._aborted_compiling: dict[str, str] = {}  # rid -> abort message, applied once it is added

    def send(self, message: msg.FromWorker) -> None:
        self.outbox.send(msg.encode(message))

    def parent_alive(self) -> bool:
        return os.getppid() == self.spec.parent_pid

    def load(self) -> msg.RankLoad:
        known = msg.RankLoad.__struct_fields__
        load = self.engine.load()
        gated = getattr(self.disagg, "num_gated", None)
        if gated is not None:  # prefill requests waiting for their decode half outside the engine are queued too
            waiting = gated()
            load["num_reqs"] += waiting
            load["num_waiting_reqs"] += waiting
        return msg.RankLoad(**{k: v for k, v in load.items() if k in known})

    def start_engine(self) -> None:
        from pdserve.engine.engine_core import EngineCore

        self.engine = EngineCore(place_on_device(self.spec.engine, self.rank, self.spec.dp_size), rank=self.rank)
        engine = self.engine
        self.start_disagg()
        pool = engine.kv_pool
        self.send(
            msg.WorkerReady(
                dp_rank=self.rank,
                pid=os.getpid(),
                model_path=os.path.abspath(engine.model_path),
                context_length=engine.context_length,
                vocab_size=engine.vocab_size,
                max_total_tokens=engine.max_total_tokens,
                page_size=pool.page_size,
                load=self.load(),
                compute_path=engine.compute_path,
            )
        )
        logger.info("dp rank %d ready: %d KV pages of %d tokens", self.rank, pool.num_pages, pool.page_size)

    def start_disagg(self) -> None:
        """Create this rank's P/D manager; a prefill rank registers at its front's bootstrap service."""
        from dataclasses import replace

        from pdserve.plane_secret import SECRET_ENV

        cfg = replace(self.spec.disagg, secret=os.environ.get(SECRET_ENV) or None)  # the front passes it by env
        if cfg.mode == "prefill":
            from pdserve.disagg.prefill import PrefillDisaggManager

            self.disagg = PrefillDisaggManager(self.engine, cfg, self.rank, cfg.host, cfg.bootstrap_port)
            self.disagg.start()
        elif cfg.mode == "decode":
            from pdserve.disagg.decode import DecodeDisaggManager

            self.disagg = DecodeDisaggManager(self.engine, cfg, self.rank)
        if self.disagg is not None and self.spec.engine.inject_faults:
            from pdserve.sim.faults import FaultInjector, FaultPlan

            self.faults = FaultInjector(FaultPlan.parse(self.spec.engine.inject_faults), cfg.mode)

    def add_request(self, message: msg.GenerateReq, req) -> None:
        """Into the engine, or through the P/D manager when the request names a room."""
        room = message.bootstrap_room
        if self.disagg is None or room is None:
            self.engine.add_request(req)
        elif self.spec.disagg.mode == "prefill":
            self.disagg.add(req, room, detached=message.detach_room)
            if self.faults is not None:
                self.faults.after_add(self.disagg, req.rid, message.label)
        else:
            from pdserve.engine.request import RequestError

            if not message.bootstrap_host:
                raise RequestError("bootstrap_host is required with bootstrap_room on a decode server")
            self.disagg.add(req, room, message.bootstrap_host, message.bootstrap_port, message.prefill_dp_rank,
                            prefill_instance=message.prefill_instance, room_known=message.prefill_room_known)
            if self.faults is not None:
                self.faults.after_add(self.disagg, req.rid, message.label)

    def compile_grammar(self, message: msg.GenerateReq, req) -> None:
        """Check ``req`` against the limits now and compile its grammar on the grammar thread."""
        from pdserve.engine.grammar import CompileThread

        self.engine.check_limits(req)
        if self.grammars is None:
            self.grammars = CompileThread(self.engine.grammar_matcher)
            self._poller.register(self.grammars.fileno(), zmq.POLLIN)
        self._compiling[message.rid] = (message, req)
        self.grammars.submit(message.rid, req.params)

    def admit_compiled(self) -> None:
        """Requests whose grammar is compiled enter the engine (or are refused naming the field)."""
        if self.grammars is None or not self.grammars.pending:
            return
        for rid, matcher, error in self.grammars.done():
            message, req = self._compiling.pop(rid)
            aborted = self._aborted_compiling.pop(rid, None)
            if error is None:
                req.grammar = matcher
            self._add(message, req, error)
            if aborted is not None and error is None:
                self._abort(rid, aborted)

    def _add(self, message: msg.GenerateReq, req, error: Exception | None = None) -> None:
        """Add ``req``; a refusal (``error``, or one raised now) goes back as ReqRejected."""
        from pdserve.engine.request import RequestError

        try:
            if error is not None:
                raise error
            self.add_request(message, req)
        except RequestError as e:
            self.send(msg.ReqRejected(self.rank, message.rid, str(e), getattr(e, "status", 400)))
        except Exception as e:  # an engine bug must fail the request, not the rank
            logger.error("dp rank %d: add_request(%s) failed", self.rank, message.rid,
                         exc_info=(type(e), e, e.__traceback__))
            self.send(msg.ReqRejected(self.rank, message.rid, f"internal error: {e}", 500))

    def _abort(self, rid: str, message: str) -> None:
        if self.disagg is not None:
            self.disagg.abort(rid, message)
        else:
            self.engine.abort(rid)
        self._step_due = True

    def handle(self, message: msg.ToWorker) -> bool:
        """Apply one message; False means shut down."""
        from pdserve.engine.grammar import grammar_field
        from pdserve.engine.request import Req, RequestError

        if isinstance(message, msg.GenerateReq):
            req = Req(
                rid=message.rid,
                input_ids=message.input_ids,
                params=message.sampling_params,
                return_logprob=message.return_logprob,
                top_logprobs_num=message.top_logprobs_num,
                logprob_start_len=message.logprob_start_len,
            )
            try:
                if grammar_field(req.params) is not None:
                    self.compile_grammar(message, req)
                    return True
            except RequestError as e:
                self.send(msg.ReqRejected(self.rank, message.rid, str(e), getattr(e, "status", 400)))
                return True
            self._add(message, req)
        elif isinstance(message, msg.AbortReq):
            if message.rid in self._compiling:
                self._aborted_compiling.setdefault(message.rid, message.message)
            else:
                self._abort(message.rid, message.message)
        elif isinstance(message, msg.RejectRoom):
            if self.spec.disagg.mode == "prefill":
                self.disagg.reject_room(message.room, message.reason, message.status,
                                        message.cause or "prefill_rejected")
        elif isinstance(message, msg.FlushCacheReq):
            refusal = self.engine.flush_cache()
            self.send_cache_events()
            self.send_outputs([], {})  # the load changed without outputs to carry it
            self.send(msg.FlushCacheDone(self.rank, message.req_id, refusal is None, refusal or ""))
        elif isinstance(message, msg.ShutdownReq):
            return False
        return True

    def drain(self) -> bool:
        """Handle every message already queued, without blocking; False means shut down."""
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if not self.handle(msg.decode_to_worker(data)):
                return False

    def run(self) -> int:
        engine, disagg = self.engine, self.disagg
        poller = self._poller
        if disagg is not None:
            poller.register(disagg.fileno(), zmq.POLLIN)
        while self.parent_alive():
            if disagg is not None:
                self.report_disagg_stats()
            if not (engine.runnable() or self._step_due):
                wait_s = disagg.timeout_s() if disagg is not None else None
                timeout_ms = IDLE_POLL_MS if wait_s is None else min(IDLE_POLL_MS, int(wait_s * 1000))
                if not poller.poll(timeout_ms) and wait_s is None:
                    continue
            if not self.drain():
                return 0
            self.admit_compiled()
            outputs = []
            if engine.has_work() or self._step_due:
                self._step_due = False
                outputs = engine.step()
                if not engine.scheduler.num_requests():
                    engine.check_idle()  # just became idle: the books must balance
            meta = {}
            if disagg is not None:
                outputs, meta = disagg.process(outputs)
                if self.faults is not None:
                    self.faults.after_step(disagg, outputs)
            self.send_cache_events()
            if outputs:
                self.send_outputs(outputs, meta)
        logger.warning("dp rank %d: parent process %d is gone, exiting", self.rank, self.spec.parent_pid)
        self.remove_socket_dir()
        return 0

    def report_disagg_stats(self) -> None:
        """Send the P/D counters, and the load (P/D requests wait without producing outputs that
        would carry it), when they changed; at most every :data:`DISAGG_STATS_INTERVAL_S`."""
        now = time.monotonic()
        last_at, last = self._stats_sent
        if now - last_at < DISAGG_STATS_INTERVAL_S:
            return
        report = self.disagg.metrics()
        if report != last:
            self.send(msg.DisaggStats(self.rank, report))
        self._stats_sent = (now, report)
        if self.load() != self._load_sent:
            self.send_outputs([], {})

    def send_cache_events(self) -> None:
        cache = self.engine.prefix_cache
        if cache is not None and cache.events:
            self.send(msg.CacheEvents(self.rank, cache.drain_events()))

    def send_outputs(self, outputs: list, meta: dict) -> None:
        load = self.load()
        self.send(msg.OutputBatch(self.rank, outputs, load, meta))
        self._load_sent = load

    def remove_socket_dir(self) -> None:
        """The front could not clean up after itself: remove its ipc socket folder (any rank may)."""
        if self.spec.input_addr.startswith("ipc://"):
            shutil.rmtree(os.path.dirname(self.spec.input_addr[len("ipc://"):]), ignore_errors=True)

    def close(self) -> None:
        if self.disagg is not None:
            self.disagg.close()
        self.inbox.close(0)
        self.outbox.close()
        self.ctx.term()


def place_on_device(config: EngineConfig, rank: int, dp_size: int) -> EngineConfig:
    """With several GPUs and no explicit ``cuda:N``, spread DP ranks over them round-robin; ranks
    sharing a device split its KV memory budget."""
    import torch

    if config.device not in (None, "cuda") or not torch.cuda.is_available():
        return config
    gpus = torch.cuda.device_count()
    return replace(config, device=f"cuda:{rank % gpus}", engines_per_device=-(-dp_size // gpus))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = msg.decode_spec(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front shuts us down
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s [dp{spec.dp_rank}] %(levelname)s %(name)s: %(message)s",
    )
    worker = Worker(spec)
    try:
        worker.start_engine()
        return worker.run()
    except Exception:
        text = traceback.format_exc()
        logger.error("dp rank %d failed:\n%s", spec.dp_rank, text)
        worker.send(msg.WorkerFailed(spec.dp_rank, text))
        return 1
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())

