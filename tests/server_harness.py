"""Start and stop a real ``pdserve serve`` process for the server tests.

Each server runs in its own process group (so a finalizer can kill it and its workers at once)
on a free loopback port, logging to a file that failures print.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy within {timeout:.0f} s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM the whole group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def launch(args: list[str], log_dir: Path, api_key: str | None = None, env: dict[str, str] | None = None,
           command: str = "serve", port: int | None = None) -> ServerProcess:
    """Start ``pdserve serve`` (or ``pdserve router`` with ``command="router"``) with ``args`` (and
    extra environment variables ``env``) on ``port`` (default: a free one; a given one, e.g. a stopped
    server's, is waited for until it is free)."""
    if port is None:
        port = free_port()
    elif not wait_until(lambda: port_is_free(port), 20):
        raise RuntimeError(f"port {port} is still in use")
    log_path = log_dir / f"{'server' if command == 'serve' else command}-{port}.log"
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pdserve.cli", command, "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=REPO_ROOT, start_new_session=True,
        )
    return ServerProcess(proc, port, log_path, api_key)


def stream_gaps(base_url: str, during=None, tokens: int = 3000, tail_events: int = 20) -> list[float]:
    """Seconds between the events of a ``tokens``-token ``/generate`` stream (another client's pace).
    ``during()`` runs once it has started; the stream is then read ``tail_events`` events past its end
    (or to its own end) and closed, so the gaps span all of ``during``; without ``during`` it is read whole."""

    stamps: list[float] = []
    finished = threading.Event()

    def stream() -> None:
        body = {"text": "Once upon a time", "stream": True,
                "sampling_params": {"max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}}
        with httpx.Client(base_url=base_url, timeout=60.0) as c, c.stream("POST", "/generate", json=body) as resp:
            after = 0  # events since during() returned
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.monotonic())
                    after += finished.is_set()
                    if after > tail_events:
                        return

    streamer = threading.Thread(target=stream)
    streamer.start()
    deadline = time.monotonic() + 30
    while len(stamps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stamps, "the stream did not start"
    if during is not None:
        during()
        ended = time.monotonic()
        finished.set()
    streamer.join(60)
    if during is None:
        assert len(stamps) > tokens // 4
    else:
        assert stamps[-1] > ended, "the stream ended before what ran during it"
    return [b - a for a, b in zip(stamps, stamps[1:])]
