"""The suite's fleet: simulated P/D servers behind fault relays, the router under test, and what the
servers say about each request (their access logs and ``/get_load``)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench.cluster import HOST, Cluster, ClusterError, Proc
from pdserve.conformance.faultproxy import FailPlan, FaultProxy, ProxyLoop
from pdserve.router.launch import free_ports

ACCESS = re.compile(r"pdserve\.access: (\S+) (\S+) (\d+) rid=(\S+) room=(\S+) prefill_rank=(\S+) decode_rank=(\S+)")
_HTTP = httpx.Client(timeout=5.0)  # the suite's own calls to the servers (thread-safe, kept alive)
PLACEHOLDERS = ("port", "prefill_args", "decode_args", "prefill_urls", "decode_urls", "python", "free_port")


@dataclass
class Served:
    """One access-log line: which server and ranks served one leg."""

    server: str
    role: str
    route: str
    status: int
    rid: str
    room: int | None
    prefill_rank: int | None
    decode_rank: int | None


def _int(text: str) -> int | None:
    return int(text) if text.lstrip("-").isdigit() else None


@dataclass
class Server:
    """One sim server of the fleet and the relay the router is given instead of its port."""

    name: str
    role: str
    dp_size: int
    proc: Proc
    proxy: FaultProxy | None = None
    _log_offset: int = 0
    served: list[Served] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The URL the router gets (the relay)."""
        assert self.proxy is not None
        return self.proxy.url

    def read_log(self) -> None:
        """Parse the access-log lines written since the last call."""
        try:
            with open(self.proc.log_path, "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._log_offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            m = ACCESS.search(line)
            if m:
                self.served.append(Served(self.name, self.role, m[2], int(m[3]), m[4], _int(m[5]),
                                          _int(m[6]), _int(m[7])))

    def loads(self) -> list[dict[str, Any]]:
        """This server's ``/get_load`` (straight to the server, not through the relay)."""
        return _HTTP.get(self.proc.url + "/get_load").json()

    def sim_host_pids(self) -> list[int]:
        """The processes of this server's group other than its front: the sim host holding its ranks."""
        return [pid for pid in self.proc.group_pids() if pid != self.proc.pid]


class Fleet:
    """Start the sim servers (prefill DP sizes ``prefill_dp``, decode ``decode_dp``), their relays,
    and the router from ``template``; :meth:`close` stops everything."""

    def __init__(self, log_dir: Path, prefill_dp: list[int], decode_dp: list[int],
                 decode_max_total_tokens: int, time_scale: float = 5.0) -> None:
        self.cluster = Cluster(log_dir, log_level="info")
        self.loop = ProxyLoop()
        self.servers: list[Server] = []
        self.router: Proc | None = None
        self.router_url = ""
        sim = ["--simulate", "H100-SXM", "--time-scale", str(time_scale), "--page-size", "16",
               "--disaggregation-bootstrap-timeout", "10", "--disaggregation-waiting-timeout", "10"]
        try:
            for i, dp in enumerate(prefill_dp):
                proc = self.cluster.server(f"p{i}", "prefill", dp, transfer_backend="sim",
                                           max_total_tokens=16384, extra=sim)
                self.servers.append(Server(proc.name, "prefill", dp, proc))
            for i, dp in enumerate(decode_dp):
                proc = self.cluster.server(f"d{i}", "decode", dp, transfer_backend="sim",
                                           max_total_tokens=decode_max_total_tokens, extra=sim)
                self.servers.append(Server(proc.name, "decode", dp, proc))
            self.cluster.wait_healthy(timeout=240)
            for s in self.servers:
                s.proxy = FaultProxy(s.name, s.proc.port, self.loop)
        except BaseException:
            self.close()
            raise

    @property
    def prefills(self) -> list[Server]:
        return [s for s in self.servers if s.role == "prefill"]

    @property
    def decodes(self) -> list[Server]:
        return [s for s in self.servers if s.role == "decode"]

    def placeholders(self, port: int, free_port: int) -> dict[str, str]:
        """What the router template's placeholders stand for (``free_port``: one more free port, e.g.
        for the router's metrics listener)."""
        return {
            "port": str(port),
            "free_port": str(free_port),
            "prefill_args": " ".join(f"--prefill {s.url} {s.proc.bootstrap_port}" for s in self.prefills),
            "decode_args": " ".join(f"--decode {s.url}" for s in self.decodes),
            "prefill_urls": " ".join(s.url for s in self.prefills),
            "decode_urls": " ".join(s.url for s in self.decodes),
            "python": shlex.quote(sys.executable),
        }

    def start_router(self, template: str, timeout: float = 60.0, ready_timeout: float = 20.0) -> str:
        """Run the router's command line and wait until it listens, then (at most ``ready_timeout``)
        until its ``/readiness`` (else ``/health``) answers 200; a router that never says so is still
        tested (its cases fail with what it answers). Returns a note on readiness."""
        port, free_port = free_ports(2, HOST)
        cmd = shlex.split(template.format(**self.placeholders(port, free_port)))
        self.router = self.cluster.spawn("router", cmd, port)
        self.router_url = self.router.url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.popen.poll() is not None:
                raise ClusterError(f"the router exited with {self.router.popen.returncode}:\n{self.router.log_tail()}")
            if _listening(port):
                break
            time.sleep(0.2)
        else:
            raise ClusterError(f"the router did not listen on port {port} within {timeout:.0f} s:\n{self.router.log_tail()}")
        paths = ["/readiness", "/health"]
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and paths:
            try:
                status = httpx.get(self.router_url + paths[0], timeout=5.0).status_code
            except httpx.HTTPError:
                status = 0
            if status == 200:
                return f"{paths[0]} answered 200"
            if status in (404, 405):  # no such route on this router: the next one
                paths.pop(0)
                continue
            time.sleep(0.25)
        return f"never ready: /readiness and /health did not answer 200 within {ready_timeout:.0f} s"

    # ------------------------------------------------------------------ what the servers saw
    def read_logs(self) -> None:
        for s in self.servers:
            s.read_log()

    def served(self, rid: str | None = None, room: int | None = None) -> list[Served]:
        """Access-log lines of every server for ``rid`` or ``room``."""
        self.read_logs()
        return [x for s in self.servers for x in s.served
                if (rid is not None and x.rid == rid) or (room is not None and x.room == room)]

    def load_totals(self, role: str | None = None) -> dict[str, int]:
        """Sums over the ranks of the servers of ``role`` (all when None) of the ``/get_load`` counters."""
        out: dict[str, int] = {}
        for s in self.servers:
            if role and s.role != role:
                continue
            try:
                ranks = s.loads()
            except (httpx.HTTPError, ValueError):
                continue
            for rank in ranks:
                for key in ("num_reqs", "num_waiting_reqs", "num_used_pages", "num_retractions",
                            "prefill_tokens_computed"):
                    out[key] = out.get(key, 0) + int(rank.get(key) or 0)
        return out

    def busy(self) -> list[str]:
        """The servers that still hold a request or pages in use."""
        out = []
        for s in self.servers:
            try:
                ranks = s.loads()
            except (httpx.HTTPError, ValueError):
                continue
            held = sum(int(r.get("num_reqs") or 0) + int(r.get("num_waiting_reqs") or 0) for r in ranks)
            pages = sum(int(r.get("num_used_pages") or 0) for r in ranks)
            if held or pages:
                out.append(f"{s.name} ({held} requests, {pages} pages in use)")
        return out

    def wait_idle(self, timeout: float) -> list[str]:
        """Until no server holds a request; what was still busy at the bound (empty: idle)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.busy()
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(0.2)

    def fail_next(self, role: str, status: int) -> FailPlan:
        """The next generation request reaching any ``role`` server is answered ``status`` by its relay."""
        plan = FailPlan(status)
        for s in self.servers:
            if s.role == role and s.proxy is not None:
                s.proxy.fail = plan
        return plan

    def clear_faults(self) -> None:
        for s in self.servers:
            if s.proxy is not None:
                s.proxy.fail = None
                s.proxy.delay_s = 0.0

    def kill_ranks(self, server: Server) -> list[int]:
        """SIGKILL the sim host holding every DP rank of ``server`` (its front stays up)."""
        pids = server.sim_host_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def close(self) -> None:
        for s in self.servers:
            if s.proxy is not None:
                s.proxy.shutdown()
        self.cluster.close()
        self.loop.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0
