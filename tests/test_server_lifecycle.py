"""Process lifecycle of ``pdserve serve``: startup health, a dying worker, SIGTERM, a dying parent, bad flags."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pdserve.cpu_threads import torch_threads_per_worker
from tests.server_harness import alive, launch, port_is_free, wait_until


def _spec_of(pid: int) -> dict:
    """A worker's startup spec, from its command line."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return json.loads(args[args.index(b"pdserve.server.worker") + 1])


def _rank_of(pid: int) -> int:
    return _spec_of(pid)["dp_rank"]


def test_default_torch_threads_leave_the_front_a_core():
    assert [torch_threads_per_worker(dp, c) for c, dp in ((1, 1), (2, 1), (2, 2), (4, 1), (16, 1), (16, 4), (3, 8))] == \
        [1, 1, 1, 3, 15, 3, 1]


def test_worker_death_then_sigterm(tmp_path):
    srv = launch(["--dp-size", "2", "--max-total-tokens", "4096", "--load-balance-method", "follow_bootstrap_room"],
                 tmp_path)
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                statuses.append(httpx.get(srv.url + "/health", timeout=2).status_code)
            if statuses and statuses[-1] == 200:
                break
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.05)
        assert statuses[-1] == 200, srv.log()
        assert 503 in statuses  # the port opens before the workers are ready
        workers = {_rank_of(pid): pid for pid in srv.worker_pids()}
        assert sorted(workers) == [0, 1]
        expected_threads = torch_threads_per_worker(2)
        assert {_spec_of(pid)["engine"]["torch_threads"] for pid in workers.values()} == {expected_threads}
        for room in (7, 8, 2**62 + 1):
            body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}, "bootstrap_room": room,
                    "bootstrap_host": "127.0.0.1", "bootstrap_port": None}
            resp = httpx.post(srv.url + "/generate", json=body, timeout=30)
            assert resp.json()["meta_info"]["dp_rank"] == room % 2

        # a stream in flight on rank 1 fails with an error event when rank 1 dies
        events: list[str] = []

        def stream() -> None:
            body = {"text": "Hi", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
                    "stream": True, "data_parallel_rank": 1}
            with httpx.stream("POST", srv.url + "/generate", json=body, timeout=30) as resp:
                events.extend(line for line in resp.iter_lines() if line.startswith("data: "))

        thread = threading.Thread(target=stream)
        thread.start()
        assert wait_until(lambda: len(events) > 0, 20)
        os.kill(workers[1], signal.SIGKILL)
        thread.join(20)
        assert not thread.is_alive()
        assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2][6:])

        # rank 0 still serves, so the server stays healthy and says rank 1 died and is being restarted
        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 200, health.text
        rank1 = health.json()["dp_ranks"][1]
        assert rank1["restarts"] >= 1 or rank1["state"] != "ready", health.text
        served = httpx.post(srv.url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                            timeout=30)
        assert served.status_code == 200
        assert wait_until(lambda: httpx.get(srv.url + "/health", timeout=5).json()["dp_ranks"][1]["state"] == "ready",
                          120)
        workers = {_rank_of(pid): pid for pid in srv.worker_pids()}
        pinned = httpx.post(srv.url + "/generate", json={"text": "hi", "data_parallel_rank": 1,
                                                          "sampling_params": {"max_new_tokens": 2}}, timeout=30)
        assert pinned.status_code == 200 and pinned.json()["meta_info"]["dp_rank"] == 1  # the restarted worker

        # SIGTERM to the front alone: it stops its workers and exits cleanly, leaving the port free
        # (uvicorn re-raises the signal after its graceful shutdown, so the status may say SIGTERM)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM), srv.log()
        assert "all workers stopped" in srv.log()
        assert wait_until(lambda: not any(alive(pid) for pid in workers.values()), 10)
        assert port_is_free(srv.port)
    finally:
        srv.stop()


def test_workers_exit_when_parent_dies(tmp_path):
    srv = launch(["--max-total-tokens", "1024", "--log-level", "warning"], tmp_path)
    try:
        srv.wait_healthy()
        workers = srv.worker_pids()
        assert len(workers) == 1
        socket_dir = Path(_spec_of(workers[0])["input_addr"].removeprefix("ipc://")).parent
        assert socket_dir.is_dir()
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        assert wait_until(lambda: not alive(workers[0]), 10), "worker outlived its parent"
        assert not socket_dir.exists()
    finally:
        srv.stop()


def test_bad_model_path_exits_with_error(tmp_path):
    missing = tmp_path / "no-such-model"
    srv = launch(["--model-path", str(missing), "--log-level", "warning"], tmp_path)
    try:
        code = srv.proc.wait(timeout=120)
        assert code != 0
        assert "no-such-model" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("flags", [["--dp-size", "0"], ["--page-size", "0"]])
def test_bad_flags_rejected(tmp_path, flags):
    srv = launch(flags, tmp_path)
    try:
        assert srv.proc.wait(timeout=60) != 0
        assert "must be" in srv.log()
    finally:
        srv.stop()


def test_sigint_to_the_group(tmp_path):
    """Ctrl-C in a terminal signals the whole group: workers ignore it, the front stops them."""
    srv = launch(["--dp-size", "2", "--max-total-tokens", "1024"], tmp_path)
    try:
        srv.wait_healthy()
        workers = srv.worker_pids()
        os.killpg(srv.proc.pid, signal.SIGINT)
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGINT), srv.log()
        assert "all workers stopped" in srv.log()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10)
        assert port_is_free(srv.port)
    finally:
        srv.stop()
