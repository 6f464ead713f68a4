"""``pdserve router --router-processes N``: N router processes on one listening port.

One Python process runs the router's event loop on one core; past that, N processes share the
listening socket, bound once before they fork (so a busy port still fails at once), and the kernel
hands each new connection to one of them. What each process knows:

- its own view of the fleet (its own health checks, ``/server_info`` and ``/get_load`` polls) and
  of its own in-flight requests. The servers' reported load (``/get_load``, polled every
  ``--load-poll-interval-secs``) is common to all, so load-aware policies see the other processes'
  requests once the servers report them, not the moment they are routed: with N processes a
  burst can put up to N requests on the same least-loaded unit before the next poll;
- its own prefix index, fed by its own predictions and by every server's KV-event feed, which
  all processes follow (so ``cache_aware`` converges on the servers' truth);
- the client ``rid``\\ s in flight through itself only; a duplicate sent to another process is
  refused by the server that already holds it (400), not by the router.

``/health`` is ready only once every process has admitted its workers (each leaves a marker in
the shared folder; the supervisor removes a dead one's). ``/metrics`` sums every process (prometheus_client's multiprocess mode, in a private folder that
lives as long as the supervisor). ``/add_worker`` and ``/remove_worker`` would change one
process only, so they are refused while N > 1. The supervisor restarts a process that dies (at
most :data:`MAX_RESTARTS` in a row within :data:`RESTART_WINDOW_S`), forwards SIGTERM and SIGINT
to every process, and exits once all have stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

logger = logging.getLogger("pdserve.router")

MAX_RESTARTS = 5  # deaths in a row (each within RESTART_WINDOW_S of the previous) before giving up
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 10.0  # after SIGTERM, processes still running are killed
POLL_S = 0.1  # how often the supervisor looks for exited processes


PROCESSES_ENV = "PDSERVE_ROUTER_PROCESSES"  # how many processes share the port, set for each of them
READY_PREFIX = "ready-"


def sibling_count() -> int:
    """How many router processes share this one's port (1 outside ``--router-processes``)."""
    return int(os.environ.get(PROCESSES_ENV, "1"))


def mark_ready() -> None:
    """This process has admitted its workers (see :func:`unready_siblings`)."""
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared and sibling_count() > 1:
        with open(os.path.join(shared, f"{READY_PREFIX}{os.getpid()}"), "w"):
            pass


def unready_siblings() -> str | None:
    """Why the router as a whole is not ready yet (a sibling process still starting), or None."""
    count, shared = sibling_count(), os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if count <= 1 or not shared:
        return None
    try:
        ready = sum(1 for name in os.listdir(shared) if name.startswith(READY_PREFIX))
    except OSError:
        ready = 0
    if ready >= count:
        return None
    return f"{count - ready} of the {count} router processes (--router-processes) have not admitted their workers yet"


def serve_processes(count: int, serve: Callable[[socket.socket], None], sock: socket.socket) -> int:
    """Run ``serve(sock)`` in ``count`` forked processes and supervise them; the exit status."""
    shared = tempfile.mkdtemp(prefix="pdserve-router-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared  # before any process imports prometheus_client
    os.environ[PROCESSES_ENV] = str(count)
    children: dict[int, int] = {}  # pid -> index
    stopping = False
    deaths: list[float] = []

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: serve until told to stop
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                serve(sock)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for index in range(count):
            spawn(index)
        logger.info("router serving on %d processes (pids %s)", count, ", ".join(map(str, children)))
        status = 0
        stop_deadline: float | None = None
        while children:
            if stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
            pid, code = _wait(stop_deadline, lambda: stopping)
            if pid == 0:  # no exit yet: the grace period is over, or a stop was just asked for
                if stop_deadline is not None and time.monotonic() >= stop_deadline:
                    for pid in list(children):
                        _signal(pid, signal.SIGKILL)
                continue
            index = children.pop(pid)
            _mark_dead(pid)
            if stopping:
                continue
            now = time.monotonic()
            deaths[:] = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            logger.error("router process %d (pid %d) exited with %s", index, pid, _describe(code))
            if len(deaths) > MAX_RESTARTS:
                logger.error("router processes died %d times within %.0f s: stopping", len(deaths), RESTART_WINDOW_S)
                status = 1
                on_signal(signal.SIGTERM, None)
                continue
            spawn(index)
        return status
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait(deadline: float | None, stop_asked: Callable[[], bool]) -> tuple[int, int]:
    """The next child to exit (pid, status); (0, 0) once ``deadline`` passes first, or as soon as a
    stop is asked while no deadline runs yet (so that the grace period starts)."""
    while True:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid:
            return pid, code
        if (deadline is None and stop_asked()) or (deadline is not None and time.monotonic() >= deadline):
            return 0, 0
        time.sleep(POLL_S)


def _mark_dead(pid: int) -> None:
    """Drop a dead process's readiness marker and live gauges from the shared folder."""
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(shared, f"{READY_PREFIX}{pid}"))
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except Exception:  # metrics cleanup must never stop the supervisor
        logger.debug("could not clean up metrics of pid %d", pid, exc_info=True)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"
