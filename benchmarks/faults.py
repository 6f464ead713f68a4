#!/usr/bin/env python
"""Faults: SIGKILL one prefill worker, then one decode worker, under steady load through the router.

One prefill server (DP 2), one decode server (DP 2) and ``pdserve router`` in front; ``--clients``
closed-loop clients send short greedy ``/generate`` requests through the router the whole time.
After a warm-up and a measured baseline, prefill rank 1's worker is SIGKILLed; once the server reports it ready again and
``--settle`` seconds have passed, decode rank 1's worker is. Reported per kill: recovery time (kill
to the rank reported ``ready`` by ``/health``), restarts, the requests that ended during recovery
and how many of them failed, and their p99 latency next to the p99 before the first kill (same
run). At the end every pool must hold zero used pages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.bench.cluster import Cluster, machine_info, write_result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load not measured")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds of load measured before the first kill")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after a recovery before the next kill")
    p.add_argument("--output", default="benchmarks/results/faults.json")
    return p.parse_args(argv)


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def rank_state(url: str, rank: int) -> dict:
    return httpx.get(url + "/health", timeout=5).json()["dp_ranks"][rank]


async def run(args: argparse.Namespace, router: str, prefill: str, decode: str) -> dict:
    done: list[tuple[float, float, int]] = []  # (start, end, status)
    stop = asyncio.Event()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = await http.post(router + "/generate", json={
                    "text": f"client {i} request {n}: the history of", "sampling_params": {
                        "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                        "temperature": 0}})
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            done.append((start, time.monotonic(), status))
            n += 1

    async def kill(name: str, url: str) -> dict:
        pid = rank_state(url, 1)["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        def back() -> bool:  # a new worker (not the killed one, before the watchdog noticed) is ready
            state = rank_state(url, 1)
            return state["state"] == "ready" and state["pid"] != pid

        while not await asyncio.to_thread(back):
            await asyncio.sleep(0.1)
        recovered = time.monotonic()
        await asyncio.sleep(args.settle)
        window = [d for d in done if killed <= d[1] <= recovered + 1.0]
        return {"killed": name, "pid": pid, "recovery_s": round(recovered - killed, 2),
                "restarts": rank_state(url, 1)["restarts"], "requests_during_recovery": len(window),
                "failed_during_recovery": sum(1 for d in window if d[2] != 200),
                "p99_latency_during_recovery_ms": round(p99([d[1] - d[0] for d in window]) * 1000, 1)}

    async with httpx.AsyncClient(timeout=120) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(args.clients)]
        await asyncio.sleep(args.warmup)
        measured_from = time.monotonic()
        await asyncio.sleep(args.baseline)
        baseline = [d[1] - d[0] for d in done if d[2] == 200 and d[0] >= measured_from]
        kills = [await kill("prefill rank 1", prefill), await kill("decode rank 1", decode)]
        stop.set()
        await asyncio.gather(*tasks)
    base_p99 = p99(baseline) * 1000
    for k in kills:
        k["p99_ratio_to_baseline"] = round(k["p99_latency_during_recovery_ms"] / base_p99, 2)
    return {"baseline_requests": len(baseline), "baseline_p99_latency_ms": round(base_p99, 1),
            "total_requests": len(done), "total_failed": sum(1 for d in done if d[2] != 200), "kills": kills}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-faults-") as logs, Cluster(logs, torch_threads=1) as cluster:
        prefill = cluster.server("prefill", "prefill", dp_size=2, max_total_tokens=4096)
        decode = cluster.server("decode", "decode", dp_size=2, max_total_tokens=4096)
        cluster.wait_healthy()
        router = cluster.pdserve_router("router", [prefill], [decode], args=[
            "--health-check-interval-secs", "1", "--worker-startup-check-interval", "0.5"])
        cluster.wait_healthy([router])
        result = asyncio.run(run(args, router.url, prefill.url, decode.url))
        deadline = time.monotonic() + 10
        while True:  # aborted rooms may hold pages until their peer confirms (bounded)
            loads = [httpx.get(s.url + "/get_load", timeout=5).json() for s in (prefill, decode)]
            result["used_pages_at_end"] = sum(r["num_used_pages"] for load in loads for r in load)
            if result["used_pages_at_end"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    print(f"baseline: {result['baseline_requests']} requests, p99 {result['baseline_p99_latency_ms']} ms")
    for k in result["kills"]:
        print(f"{k['killed']}: recovered in {k['recovery_s']} s (restarts {k['restarts']}); "
              f"{k['failed_during_recovery']} of {k['requests_during_recovery']} requests failed during recovery; "
              f"p99 {k['p99_latency_during_recovery_ms']} ms ({k['p99_ratio_to_baseline']}x baseline)")
    print(f"total: {result['total_requests']} requests, {result['total_failed']} failed; "
          f"used pages at the end: {result['used_pages_at_end']}")
    write_result(Path(args.output), {"machine": machine_info(), "args": vars(args), **result})
    return 0 if result["used_pages_at_end"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
