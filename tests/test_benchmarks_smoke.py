"""The benchmark scripts and tools run end to end, briefly, and write sane JSON.

Each runs as a subprocess at tiny sizes against a small local cluster it starts itself
(``pdserve.bench.cluster``: process groups, free loopback ports, bounded health waits). Every
process a run starts carries a unique environment tag; a finalizer kills whatever still carries
it, so nothing is left behind even when a run is killed at its timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TAG_VAR = "PDSERVE_BENCH_SMOKE_TAG"


def _tagged_pids(tag: str) -> list[int]:
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def run_tagged():
    """Run a command with a unique tag in its environment; kill every tagged process afterwards."""
    tag = uuid.uuid4().hex

    def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CI="true", **{TAG_VAR: tag})
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)

    yield run
    for pid in _tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def test_bench_transfer_small(run_tagged, tmp_path):
    out_file = tmp_path / "transfer.json"
    proc = run_tagged([sys.executable, "-m", "pdserve.cli", "bench", "transfer", "--layers", "2", "--pages", "32",
                       "--kv-heads", "2", "--head-dim", "32", "--repeat", "1", "--shuffle",
                       "--output-file", str(out_file)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_file.read_text())
    assert {r["backend"] for r in data["rows"]} == {"tcp", "tcp-staged", "shm", "nixl", "nixl-tcp", "nixl-sm",
                                                  "mooncake"}
    for r in data["rows"]:
        assert r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
        assert r["ceiling"] in ("raw socket", "memcpy") and 0 < r["target"] <= 1 and r["memcpy_gbps"] > 0
    assert data["pool_mib"] > 0 and "ratio" in proc.stdout


def test_dispatch_script_minimal(run_tagged, tmp_path):
    out_file = tmp_path / "dispatch.json"
    proc = run_tagged([sys.executable, "benchmarks/dispatch_decoupled_vs_coupled.py", "--topologies", "1x1",
                       "--num-prompts", "6", "--repeats", "1", "--long-input", "100", "150",
                       "--short-input", "8", "16", "--output-len", "2", "6", "--request-rate", "20",
                       "--decode-max-total-tokens", "1024", "--prefill-max-total-tokens", "1024",
                       "--goodput", "ttft:60000", "tpot:60000", "--log-dir", str(tmp_path / "logs"),
                       "--output-file", str(out_file)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_file.read_text())
    assert data["machine"]["nproc"] >= 1 and data["slo_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    (topo,) = data["topologies"]
    assert (topo["prefill_dp"], topo["decode_dp"]) == (1, 1)
    for name in ("decoupled", "coupled"):
        (run,) = topo["runs"][name]
        assert (run["completed"], run["failed"]) == (6, 0), run["errors"]
        assert run["slo_attainment"] == 1.0 and run["request_goodput"] > 0
        assert 0 < run["median_ttft_ms"] <= run["p99_ttft_ms"]
    assert topo["ratio_decoupled_over_coupled_of_means"]["request_goodput"] > 0
    assert "decoupled / coupled" in proc.stdout


def test_router_overhead_script_with_stubs(run_tagged, tmp_path):
    out_file = tmp_path / "router.json"
    targets = ["direct", "pdserve"] + (["sglang"] if importlib.util.find_spec("sglang_router") else [])
    proc = run_tagged([sys.executable, "benchmarks/router_overhead.py", "--no-real", "--stub-requests", "30",
                       "--warmup", "3", "--rounds", "1", "--concurrency", "1", "4", "--targets", *targets,
                       "--log-dir", str(tmp_path / "logs"), "--output-file", str(out_file)], timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_file.read_text())["rows"]
    assert {(r["target"], r["concurrency"]) for r in rows} == {(t, c) for t in targets for c in (1, 4)}
    for r in rows:
        assert r["upstreams"] == "stub" and r["requests"] == 30 and r["failures"] == 0
        assert r["keep_alive"] is True  # kept-alive connections are the default, as real clients keep them
        assert r["req_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        if r["target"] != "direct":
            assert r["router_cpu_s_per_1000"] >= 0 and "added_p50_ms" in r and r["req_per_s_vs_direct"] > 0
        if r["concurrency"] == 1:  # the latency row: kept-alive vs fresh connections, reported (not judged)
            assert r["keepalive_over_fresh_p50"] > 0 and r["other_connection_mode_p50_ms"] > 0
    if "sglang" in targets:
        pd = next(r for r in rows if r["target"] == "pdserve" and r["concurrency"] == 4)
        # reported, not judged (30 requests can fall within one 10 ms CPU tick: a ratio of 0 is possible)
        assert pd["req_per_s_vs_sglang"] > 0 and pd["cpu_vs_sglang"] >= 0 and "added_p50_minus_sglang_ms" in pd


def test_gpu_identity_script_runs_on_cpu(run_tagged):
    """benchmarks/gpu_identity.py (GPU check 1) at tiny sizes on CPU: the script a first GPU session
    runs must not die on a script bug there; float32 output equals transformers'."""
    proc = run_tagged([sys.executable, "benchmarks/gpu_identity.py", "--device", "cpu", "--models", "tiny",
                       "--dtypes", "float32", "--num-prompts", "2", "--input-len", "8", "32",
                       "--output-len", "4", "8"], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100 % of requests identical to transformers" in proc.stdout
    assert "identity: PASS" in proc.stdout
