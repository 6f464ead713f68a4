"""``pdserve launch``: prefill servers, decode servers and a router as child processes.

Each child runs in its own process group with its output prefixed by its name
(``[prefill-0] ...``). A busy router port fails before anything starts, naming who holds it (each
server and the router also bind their port before starting anything else). The launcher waits
(bounded) until every server and the router answer ``GET /health``, prints the endpoint and an
example request, and on Ctrl-C or SIGTERM (or when a child dies) starts nothing more and stops
them all: SIGTERM to each group, a bounded wait (a second Ctrl-C cuts it short), then SIGKILL to
what is left. The exit code is 1 when a child failed or startup timed out, 0 after a requested stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from pdserve.cpu_threads import torch_threads_per_worker
from pdserve.plane_secret import SECRET_ENV, generate_secret
from pdserve.ports import PortInUse, check_free
from pdserve.router.config import POLICIES
from pdserve.transfer_names import ALL_BACKENDS

STOP_GRACE_S = 15.0
POLL_S = 0.25


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    url: str | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=3))  # why it died, if it did

    def exit_summary(self) -> str:
        tail = " | ".join(line.strip() for line in self.last_lines if line.strip())
        return f"{self.name} exited with code {self.proc.returncode}" + (f": {tail}" if tail else "")


def free_ports(count: int, host: str) -> list[int]:
    """``count`` distinct ports free on ``host`` right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2.0) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


class Launcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[Child] = []
        self.print_lock = threading.Lock()
        self.stop_requested = threading.Event()
        self.kill_now = threading.Event()  # a second signal: no more grace
        # one secret per launch authenticates the P/D plane between the servers it starts (by env, not argv)
        self.secret = os.environ.get(SECRET_ENV) or generate_secret()

    # ------------------------------------------------------------------ output
    def say(self, line: str) -> None:
        with self.print_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        prefix = f"[{child.name}] "
        for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            child.last_lines.append(line)
            self.say(prefix + line)

    # ------------------------------------------------------------------ children
    def spawn(self, name: str, argv: list[str], url: str | None) -> Child:
        cmd = [sys.executable, "-m", "pdserve.cli", *argv]
        self.say(f"[launch] starting {name}: {shlex.join(cmd)}")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **{SECRET_ENV: self.secret}), start_new_session=True,
        )
        child = Child(name, proc, url)
        child.pump = threading.Thread(target=self._pump, args=(child,), name=f"pump-{name}", daemon=True)
        child.pump.start()
        self.children.append(child)
        return child

    def start_all(self) -> bool:
        """Start the servers, then the router; False (starting no more) once a stop is requested or a
        child already died."""
        a = self.args
        host = a.host
        workers = a.prefill * a.prefill_dp_size + a.decode * a.decode_dp_size
        n_ports = 2 * a.prefill + a.decode
        ports = [p for p in free_ports(n_ports + 1, host) if p != a.port][:n_ports]
        server_args = shlex.split(a.server_args or "")
        transfer_backend = a.transfer_backend or ("sim" if a.simulate else "tcp")
        if a.simulate:
            server_args += ["--simulate", a.simulate]
        if "--torch-threads" not in server_args:  # each server alone would size threads for the whole host
            server_args += ["--torch-threads", str(torch_threads_per_worker(workers))]
        if a.model_path:
            server_args += ["--model-path", a.model_path]
        if a.served_model_name:
            server_args += ["--served-model-name", a.served_model_name]
        if a.max_total_tokens:
            server_args += ["--max-total-tokens", str(a.max_total_tokens)]
        router_argv = ["router", "--pd-disaggregation", "--host", host, "--port", str(a.port)]
        for i in range(a.prefill):
            port, bootstrap = ports.pop(), ports.pop()
            url = f"http://{host}:{port}"
            if self.must_stop():
                return False
            self.spawn(f"prefill-{i}", [
                "serve", "--host", host, "--port", str(port), "--disaggregation-mode", "prefill",
                "--dp-size", str(a.prefill_dp_size), "--disaggregation-bootstrap-port", str(bootstrap),
                "--disaggregation-transfer-backend", transfer_backend, *server_args,
            ], url)
            router_argv += ["--prefill", url, str(bootstrap)]
        for i in range(a.decode):
            port = ports.pop()
            url = f"http://{host}:{port}"
            if self.must_stop():
                return False
            self.spawn(f"decode-{i}", [
                "serve", "--host", host, "--port", str(port), "--disaggregation-mode", "decode",
                "--dp-size", str(a.decode_dp_size), "--disaggregation-transfer-backend", transfer_backend,
                *server_args,
            ], url)
            router_argv += ["--decode", url]
        for flag in ("policy", "prefill_policy", "decode_policy"):
            value = getattr(a, flag)
            if value:
                router_argv += ["--" + flag.replace("_", "-"), value]
        router_argv += shlex.split(a.router_args or "")
        if self.must_stop():
            return False
        self.spawn("router", router_argv, f"http://{host}:{a.port}")
        return True

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def must_stop(self) -> bool:
        """A stop was requested or a child died: start nothing more (and say why once)."""
        if self.stop_requested.is_set():
            return True
        dead = self.dead_child()
        if dead is not None:
            self.report_dead(dead, "during startup")
            return True
        return False

    def report_dead(self, child: Child, when: str) -> None:
        if child.pump is not None:
            child.pump.join(timeout=1.0)  # its last lines say why
        self.say(f"[launch] {child.exit_summary()} ({when})")

    def wait_healthy(self, timeout: float) -> bool:
        """True once every child answers /health; False on timeout, a dead child or a stop request."""
        pending = [c for c in self.children if c.url]
        deadline = time.monotonic() + timeout
        while pending:
            if self.stop_requested.is_set():
                return False
            dead = self.dead_child()
            if dead is not None:
                self.report_dead(dead, "during startup")
                return False
            if time.monotonic() > deadline:
                self.say(f"[launch] not healthy within {timeout:.0f} s: {', '.join(c.name for c in pending)}")
                return False
            pending = [c for c in pending if not healthy(c.url or "")]
            if pending:
                self.stop_requested.wait(POLL_S)
        return True

    def stop_all(self) -> None:
        """SIGTERM every group (router first), wait with a bound, then SIGKILL every group."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and not self.kill_now.is_set():
            if all(child.proc.poll() is not None for child in self.children):
                break
            self.kill_now.wait(0.05)
        for child in self.children:
            if child.proc.poll() is None:
                why = "asked to stop at once" if self.kill_now.is_set() else f"did not stop within {STOP_GRACE_S:.0f} s"
                self.say(f"[launch] {child.name} {why}: killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)  # also any of its processes left in the group
            child.proc.wait()
            if child.pump is not None:
                child.pump.join(timeout=2.0)

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            if self.stop_requested.is_set():
                self.kill_now.set()
            self.stop_requested.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            if not self.args.model_path:
                self.say("[launch] no --model-path: serving the embedded tiny model (random weights, ~1M "
                         "parameters, built once into the cache): its output is gibberish by design; it exists "
                         "to exercise the serving stack. Pass --model-path FOLDER for a real HF checkpoint.")
            if not self.start_all() or not self.wait_healthy(self.args.startup_timeout):
                code = 0 if self.stop_requested.is_set() and self.dead_child() is None else 1
                return code
            url = f"http://{self.args.host}:{self.args.port}"
            self.say(f"[launch] ready: {url}  (Ctrl-C stops everything)")
            self.say(f"[launch] try: curl -s {url}/generate -H 'Content-Type: application/json' "
                     "-d '{\"text\": \"Hello, world\", \"sampling_params\": {\"max_new_tokens\": 16, \"temperature\": 0}}'")
            while not self.stop_requested.wait(POLL_S):
                dead = self.dead_child()
                if dead is not None:
                    self.report_dead(dead, "stopping everything")
                    code = 1
                    break
            return code
        finally:
            self.say("[launch] stopping")
            self.stop_all()
            for s, handler in old.items():
                signal.signal(s, handler)
            self.say("[launch] stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="HF checkpoint folder (default: the embedded tiny model)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id on /v1/models and in responses (default: the model folder path)")
    parser.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill servers (default: %(default)s)")
    parser.add_argument("--decode", type=int, default=1, metavar="M", help="decode servers (default: %(default)s)")
    parser.add_argument("--prefill-dp-size", type=int, default=2, help="DP ranks per prefill server")
    parser.add_argument("--decode-dp-size", type=int, default=2, help="DP ranks per decode server")
    parser.add_argument("--host", default="127.0.0.1", help="address of the router and the servers")
    parser.add_argument("--port", type=int, default=8000, help="router port (0: a free one)")
    parser.add_argument("--transfer-backend", choices=ALL_BACKENDS, default=None,
                        help="KV transfer backend (default: tcp, or sim with --simulate)")
    parser.add_argument("--simulate", default=None, metavar="HARDWARE|profile:FILE",
                        help="simulated compute on every server (see docs/simulation.md)")
    parser.add_argument("--policy", choices=POLICIES, default=None, help="router policy of both sides")
    parser.add_argument("--prefill-policy", choices=POLICIES, default=None,
                        help="router policy of the prefill side (default: --policy's)")
    parser.add_argument("--decode-policy", choices=POLICIES, default=None,
                        help="router policy of the decode side (default: --policy's)")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="KV capacity of each DP rank")
    parser.add_argument("--server-args", default="", help="extra flags for every server, one shell-quoted string")
    parser.add_argument("--router-args", default="", help="extra flags for the router, one shell-quoted string")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds to wait for health (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1 or args.prefill_dp_size < 1 or args.decode_dp_size < 1:
        raise SystemExit("pdserve launch: --prefill, --decode and the DP sizes must be >= 1")
    if args.port == 0:
        args.port = free_ports(1, args.host)[0]
    try:
        check_free(args.host, args.port)
    except PortInUse as e:
        print(f"pdserve launch: router {e}; stop it or pass --port N (0 picks a free one). Nothing was started.",
              file=sys.stderr)
        return 1
    return Launcher(args).run()
