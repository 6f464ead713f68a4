"""Code a request supplies runs here: in a child process of its own, one job at a time.

Two runners, so neither kind queues behind the other: chat templates, and grammars and tool
schemas (:mod:`pdserve.server.grammar_check`, llguidance compiling in the child, killed at its
deadline, a crash of the child — a grammar deep enough to overflow llguidance's stack — a refusal
of that request only).

A chat template a request brings (``--trust-request-chat-template``) is rendered by
:func:`pdserve.models.tokenizer.render_request_template`, which stops itself at its deadline and
output cap. It runs in a separate, lower-priority process, so it never holds the front's GIL or
its tokenizer threads: other clients' streams, tokenization and ``/health`` keep their pace. Jobs
queue in the front (one renders at a time) and each one's deadline starts when it runs; a child
still busy a grace period past the deadline (a single C-level operation the caps missed) is killed
and the next job gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

KILL_GRACE_S = 1.0  # past its deadline, a job's child is killed
CHILD_NICENESS = 10  # the child yields the CPU to the front and the workers


class RequestCodeTimeout(Exception):
    """The child did not come back within the deadline and the grace period; it was killed."""


class RequestCodeCrashed(Exception):
    """The child died running the job (a signal, say SIGSEGV); the next job gets a fresh one."""


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)


def _start_child(init: Any, args: tuple[Any, ...]) -> None:
    _lower_priority()
    if init is not None:
        init(*args)


class RequestCodeRunner:
    """A one-process pool for request-supplied code, started on first use."""

    def __init__(self, grace_s: float = KILL_GRACE_S, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> None:
        self.grace_s = grace_s
        self.initializer = initializer  # run in each fresh child before its first job (untimed)
        self.initargs = initargs
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def run(self, deadline_s: float, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the child (``fn`` bounds itself by ``deadline_s``); kill the child and
        raise :class:`RequestCodeTimeout` if it has not answered ``grace_s`` after that, and
        :class:`RequestCodeCrashed` if it died. A child is started (untimed) before the first job
        and after each kill or crash."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_child, initargs=(self.initializer, self.initargs))
                try:
                    await loop.run_in_executor(self._pool, os.getpid)  # the child's start is not the job's time
                except BrokenProcessPool:
                    self._kill()
                    raise RequestCodeCrashed("the child process could not start") from None
            future = loop.run_in_executor(self._pool, fn, *args)
            try:
                return await asyncio.wait_for(future, deadline_s + self.grace_s)
            except asyncio.TimeoutError:
                self._kill()
                raise RequestCodeTimeout(f"did not finish within {deadline_s:g} s") from None
            except BrokenProcessPool:
                self._kill()
                raise RequestCodeCrashed("its process died") from None

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()

    def close(self) -> None:
        self._kill()


class RequestCodePool:
    """``size`` one-process runners, each job on a free one: one hostile job (busy to its deadline)
    does not hold up the others' jobs; only ``size`` of them at once do."""

    def __init__(self, size: int, grace_s: float = KILL_GRACE_S, initializer: Any = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self.runners = [RequestCodeRunner(grace_s, initializer, initargs) for _ in range(size)]
        self._free: asyncio.Queue[RequestCodeRunner] | None = None

    async def run(self, deadline_s: float, fn: Any, *args: Any) -> Any:
        """As :meth:`RequestCodeRunner.run`, on the first runner free."""
        if self._free is None:
            self._free = asyncio.Queue()
            for runner in self.runners:
                self._free.put_nowait(runner)
        runner = await self._free.get()
        try:
            return await runner.run(deadline_s, fn, *args)
        finally:
            self._free.put_nowait(runner)

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
