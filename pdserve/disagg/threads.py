"""The two thread helpers of the P/D managers.

The engine loop is single-threaded; network I/O happens on an :class:`EventLoopThread` (control
plane, bootstrap lookups) and on the transfer backends' own threads. Results come back through an
:class:`Inbox`, which the engine thread drains once per loop iteration; its :attr:`Inbox.fileno`
becomes readable when something arrives, so a worker can sleep on it together with its sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
from collections.abc import Coroutine
from typing import Any


class Inbox:
    """Thread-safe queue whose arrivals also make a pipe readable (for select/zmq.Poller)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def put(self, item: Any) -> None:
        self._queue.put(item)
        with contextlib.suppress(OSError):  # pipe full: a wake-up is already pending; closed: shutting down
            os.write(self._write_fd, b"\0")

    def drain(self) -> list[Any]:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class EventLoopThread:
    """An asyncio loop on a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run ``coro`` on the loop and wait for its result at most ``timeout`` seconds."""
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
