"""Code a request supplies runs here: in a child process of its own, one job at a time.

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
from typing import Any

KILL_GRACE_S = 1.0  # past its deadline, a job's child is killed
CHILD_NICENESS = 10  # the child yields the CPU to the front and the workers


class RequestCodeTimeout(Exception):
    """The child did not come back within the deadline and the grace period; it was killed."""


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)


class RequestCodeRunner:
    """A one-process pool for request-supplied code, started on first use."""

    def __init__(self, grace_s: float = KILL_GRACE_S) -> None:
        self.grace_s = grace_s
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def run(self, deadline_s: float, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the child (``fn`` bounds itself by ``deadline_s``); kill the child and
        raise :class:`RequestCodeTimeout` if it has not answered ``grace_s`` after that. A child
        is started (untimed) before the first job and after each kill."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_lower_priority)
                await loop.run_in_executor(self._pool, os.getpid)  # the child's start is not the job's time
            future = loop.run_in_executor(self._pool, fn, *args)
            try:
                return await asyncio.wait_for(future, deadline_s + self.grace_s)
            except asyncio.TimeoutError:
                self._kill()
                raise RequestCodeTimeout(f"did not finish within {deadline_s:g} s") from None

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
