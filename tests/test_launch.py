"""``pdserve launch`` / ``serve`` / ``router`` when a port is taken or the launch is stopped while
starting: a clear error naming the port and its owner, nothing started after the stop, every child
gone, a non-zero exit on failure. Real processes throughout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_harness import REPO_ROOT, alive, free_port, wait_until
from tests.test_router_e2e import descendants

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def pdserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def owner_named(text: str, port: int) -> bool:
    return f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} " in text


def test_busy_port_fails_fast_naming_its_owner(busy_port):
    out = pdserve("launch", "--port", str(busy_port))
    assert out.returncode == 1 and owner_named(out.stderr, busy_port), out.stderr
    assert "Nothing was started" in out.stderr and "[launch] starting" not in out.stdout
    out = pdserve("serve", "--port", str(busy_port), "--dp-size", "2")
    assert out.returncode == 1 and owner_named(out.stderr, busy_port), out.stderr
    assert "started dp rank" not in out.stderr + out.stdout  # no worker was started
    out = pdserve("router", "--port", str(busy_port), "--worker-urls", "http://127.0.0.1:9")
    assert out.returncode == 1 and owner_named(out.stderr, busy_port), out.stderr


class Launch:
    """A ``pdserve launch`` process whose every descendant is remembered while it runs."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "launch", *args], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV, cwd=REPO_ROOT,
                                         start_new_session=True)
        self.seen: set[int] = set()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.seen:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    def assert_all_gone(self) -> None:
        self.watcher.join(5)
        assert self.seen, self.log()
        assert wait_until(lambda: not any(alive(p) for p in self.seen), 10), [p for p in self.seen if alive(p)]
        log = self.log()
        assert "[launch] stopped" in log, log[-3000:]
        assert "[launch] starting" not in log.split("[launch] stopping", 1)[1], log[-3000:]


def test_failing_server_stops_the_launch(busy_port, tmp_path):
    launch = Launch(["--port", "0", "--server-args", f"--disaggregation-bootstrap-port {busy_port}"],
                    tmp_path / "launch.log")
    try:
        launch.proc.wait(timeout=150)
        assert launch.proc.returncode == 1, launch.log()[-3000:]
        assert "[launch] prefill-0 exited with code 1" in launch.log(), launch.log()[-3000:]
        assert owner_named(launch.log(), busy_port), launch.log()[-3000:]
        launch.assert_all_gone()
    finally:
        launch.stop()


def test_sigterm_while_starting_stops_everything(tmp_path):
    launch = Launch(["--port", str(free_port())], tmp_path / "launch.log")
    try:
        assert wait_until(lambda: "[launch] starting prefill-0" in launch.log(), 60), launch.log()
        launch.proc.send_signal(signal.SIGTERM)
        launch.proc.wait(timeout=60)
        assert launch.proc.returncode == 0, launch.log()[-3000:]
        launch.assert_all_gone()
    finally:
        launch.stop()
