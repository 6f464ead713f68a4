"""A small local cluster for benchmark scripts: ``pdserve serve`` processes and routers.

Every child runs in its own process group on a free loopback port, logging to a file in
``log_dir``; :meth:`Cluster.close` (also on leaving the ``with`` block) sends SIGTERM to every
group, waits with a bound and SIGKILLs what is left, as ``pdserve launch`` does (its
:func:`~pdserve.router.launch.free_ports` and :func:`~pdserve.router.launch.healthy` are reused).
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.router.launch import STOP_GRACE_S, free_ports, healthy

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ClusterError(RuntimeError):
    """A child did not start, died, or did not become ready in time."""


@dataclass
class Proc:
    """One child process (and its process group)."""

    name: str
    popen: subprocess.Popen
    port: int
    log_path: Path
    bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def group_pids(self) -> list[int]:
        """Every live process in this child's process group (its session), from /proc."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid:  # pgrp
                pids.append(int(entry.name))
        return pids

    def cpu_seconds(self, whole_group: bool = False) -> float:
        """User + system CPU seconds of the child (all its threads), or of its whole group."""
        total = 0.0
        for pid in (self.group_pids() if whole_group else [self.pid]):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        return total


def post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, Any]:
    """``POST url`` with a JSON body; the status and the decoded answer (None if not JSON)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


class Cluster:
    """Start servers and routers; stop them all on :meth:`close`."""

    def __init__(self, log_dir: str | Path, model_path: str | None = None, log_level: str = "warning",
                 torch_threads: int | None = None) -> None:
        """``torch_threads``: passed to every server as ``--torch-threads``. A server divides the
        cores by its own DP size only, so several servers on one machine oversubscribe the cores
        (OpenMP threads spinning against each other) unless this is set; see :func:`pdserve.cpu_threads.torch_threads_per_worker`."""
        self.log_dir = Path(log_dir)
        self.torch_threads = torch_threads
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = model_path
        self.log_level = log_level
        self.procs: list[Proc] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ children
    def _spawn(self, name: str, cmd: list[str], port: int, bootstrap_port: int | None = None,
               env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        proc = Proc(name, popen, port, log_path, bootstrap_port)
        self.procs.append(proc)
        return proc

    def spawn(self, name: str, cmd: list[str], port: int) -> Proc:
        """Any command (e.g. a third-party router) as a child listening on ``port``; stopped by :meth:`close`."""
        return self._spawn(name, cmd, port)

    def server(self, name: str, mode: str | None = None, dp_size: int = 1, max_total_tokens: int | None = None,
               transfer_backend: str = "tcp", extra: list[str] | tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> Proc:
        """A ``pdserve serve`` process: mixed (``mode=None``), ``prefill`` or ``decode``; ``env`` is
        added to its environment (e.g. ``PYTHONPATH`` of another source tree, for a baseline)."""
        port, bootstrap = free_ports(2, HOST)
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--host", HOST, "--port", str(port),
               "--dp-size", str(dp_size), "--log-level", self.log_level]
        if self.model_path:
            cmd += ["--model-path", self.model_path]
        if max_total_tokens:
            cmd += ["--max-total-tokens", str(max_total_tokens)]
        if self.torch_threads:
            cmd += ["--torch-threads", str(self.torch_threads)]
        if mode:
            cmd += ["--disaggregation-mode", mode, "--disaggregation-transfer-backend", transfer_backend]
        if mode == "prefill":
            cmd += ["--disaggregation-bootstrap-port", str(bootstrap)]
        cmd += list(extra)
        return self._spawn(name, cmd, port, bootstrap if mode == "prefill" else None, env)

    def stub(self, name: str, mode: str | None = None) -> Proc:
        """A STUB upstream (:mod:`pdserve.bench.stub_server`): answers at once, computes nothing."""
        port, bootstrap = free_ports(2, HOST)
        cmd = [sys.executable, "-m", "pdserve.bench.stub_server", "--port", str(port), "--mode", mode or "null"]
        if mode == "prefill":
            cmd += ["--bootstrap-port", str(bootstrap)]
        return self._spawn(name, cmd, port, bootstrap if mode == "prefill" else None)

    def pdserve_router(self, name: str, prefill: list[Proc] = (), decode: list[Proc] = (),
                       mixed: list[Proc] = (), args: list[str] | tuple[str, ...] = ()) -> Proc:
        """``pdserve router`` in front of ``prefill``/``decode`` servers (P/D) or ``mixed`` ones."""
        (port,) = free_ports(1, HOST)
        cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", HOST, "--port", str(port),
               "--log-level", "warn"]
        if mixed:
            cmd += ["--worker-urls", *(p.url for p in mixed)]
        else:
            cmd += ["--pd-disaggregation"]
            for p in prefill:
                cmd += ["--prefill", p.url, str(p.bootstrap_port)]
            for p in decode:
                cmd += ["--decode", p.url]
        return self._spawn(name, cmd + list(args), port)

    def sglang_router(self, name: str, prefill: list[Proc], decode: list[Proc],
                      args: list[str] | tuple[str, ...] = ()) -> Proc:
        """sglang-router (``python -m sglang_router.launch_router``) in PD mode, loopback only,
        never ``--dp-aware``."""
        port, prom = free_ports(2, HOST)
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(port),
               "--pd-disaggregation", "--prometheus-host", HOST, "--prometheus-port", str(prom),
               "--log-level", "warn"]
        for p in prefill:
            cmd += ["--prefill", p.url, str(p.bootstrap_port)]
        for p in decode:
            cmd += ["--decode", p.url]
        assert "--dp-aware" not in args
        return self._spawn(name, cmd + list(args), port)

    # ------------------------------------------------------------------ readiness
    def wait_healthy(self, procs: list[Proc] | None = None, timeout: float = 180.0) -> None:
        """Until every one of ``procs`` (default: all) answers ``GET /health`` 2xx; raises at the bound
        or when one exits."""
        pending = list(procs if procs is not None else self.procs)
        deadline = time.monotonic() + timeout
        while pending:
            for p in pending:
                if p.popen.poll() is not None:
                    raise ClusterError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"not healthy within {timeout:.0f} s: {', '.join(p.name for p in pending)}\n"
                                   + "\n".join(p.log_tail(1500) for p in pending))
            pending = [p for p in pending if not healthy(p.url)]
            if pending:
                time.sleep(0.25)

    def wait_serving(self, proc: Proc, timeout: float = 60.0) -> None:
        """Until a one-token ``/generate`` through ``proc`` (a router) succeeds: its workers are admitted."""
        self.wait_healthy([proc], timeout)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ClusterError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                status, last = post_json(proc.url + "/generate", {
                    "text": "hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, timeout=10.0)
                if status == 200:
                    return
            except OSError as e:
                last = e
            time.sleep(0.25)
        raise ClusterError(f"{proc.name} did not serve within {timeout:.0f} s (last: {last}):\n{proc.log_tail()}")

    def warm_up(self, proc: Proc, dp_size: int, prompt_lens: tuple[int, ...] = (16, 1024), new_tokens: int = 8) -> None:
        """Run a few local generations on every DP rank of a mixed or prefill server (no bootstrap
        room, so a prefill server serves them itself): the first forwards of a fresh worker are much
        slower. A decode server needs :meth:`warm_up_pd`."""
        for rank in range(dp_size):
            for n in prompt_lens:
                status, body = post_json(proc.url + "/generate", {
                    "input_ids": [10 + (i % 500) for i in range(n)], "data_parallel_rank": rank,
                    "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}},
                    timeout=120.0)
                if status != 200:
                    raise ClusterError(f"warm-up of {proc.name} rank {rank} failed: HTTP {status} {body}")

    def warm_up_pd(self, prefill: Proc, decode: Proc, prefill_dp: int, decode_dp: int,
                   prompt_lens: tuple[int, ...] = (16, 1024), new_tokens: int = 8) -> None:
        """Warm a prefill/decode pair with P/D requests (both halves at once, one bootstrap room
        each), so every rank of both and the KV transfer between them have run: a decode server
        refuses a request that names no KV source."""
        if prefill.bootstrap_port is None:
            raise ClusterError(f"{prefill.name} is not a prefill server (no bootstrap port)")
        room = 1 << 40
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for i in range(max(prefill_dp, decode_dp)):
                p_rank, d_rank = i % prefill_dp, i % decode_dp
                for n in prompt_lens:
                    room += 1
                    body = {"input_ids": [10 + (k % 500) for k in range(n)],
                            "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0},
                            "bootstrap_host": HOST, "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": room}
                    halves = [(prefill, {**body, "data_parallel_rank": p_rank}),
                              (decode, {**body, "data_parallel_rank": d_rank, "disagg_prefill_dp_rank": p_rank})]
                    futures = [pool.submit(post_json, proc.url + "/generate", half, 120.0) for proc, half in halves]
                    for (proc, _), future in zip(halves, futures):
                        status, answer = future.result()
                        if status != 200:
                            raise ClusterError(f"P/D warm-up of {proc.name} (prefill rank {p_rank}, decode rank "
                                               f"{d_rank}, room {room}) failed: HTTP {status} {answer}")

    # ------------------------------------------------------------------ stopping
    def stop(self, *procs: Proc) -> None:
        """SIGTERM each group, wait (bounded), SIGKILL each group."""
        for p in procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.popen.poll() is None:
                p.popen.wait(timeout=10)
            if p in self.procs:
                self.procs.remove(p)

    def close(self) -> None:
        """Stop every child, routers first."""
        self.stop(*reversed(self.procs))


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU model, RAM, Python and torch versions, load."""
    import platform

    info: dict[str, Any] = {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal:"))
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON, creating the folder."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
