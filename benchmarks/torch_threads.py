"""A mixed server's torch threads per rank vs serving latency and throughput, on an idle machine and beside a
neighbour that keeps one core busy (another tenant, a test suite, a benchmark client): docs/benchmarks.md
result 15. Each round starts one DP-1 server per thread count in turn (the default, which leaves a core to
the front, and each explicit ``--torch-threads``), measures one client's 1-token and 16-token requests and
16 concurrent 32-token requests on kept-alive connections, and prints medians over rounds with their spread.

    PYTHONPATH=. python benchmarks/torch_threads.py --threads 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import httpx

from pdserve.bench.cluster import Cluster


def spin(stop: multiprocessing.synchronize.Event) -> None:
    """The neighbour: one core busy until told to stop."""
    while not stop.is_set():
        sum(range(10_000))


async def closed_loop(url: str, requests: int, concurrency: int, tokens: int) -> tuple[float, float]:
    """(output tok/s, median latency s) of ``requests`` ``/generate`` calls, ``concurrency`` at a time."""
    gate, latencies = asyncio.Semaphore(concurrency), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(i: int) -> None:
            async with gate:
                body = {"text": f"Story {i}: once upon a time",
                        "sampling_params": {"max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}}
                start = time.perf_counter()
                response = await client.post("/generate", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    return requests * tokens / wall, statistics.median(latencies)


CASES = {"1 client, 1 token": (20, 1, 1), "1 client, 16 tokens": (12, 1, 16), "16 clients, 32 tokens": (48, 16, 32)}


def measure(threads: int | None, log_dir: str) -> dict[str, tuple[float, float]]:
    extra = [] if threads is None else ["--torch-threads", str(threads)]
    with Cluster(log_dir) as cluster:
        server = cluster.server("mixed", max_total_tokens=8192, extra=extra)
        cluster.wait_healthy()
        asyncio.run(closed_loop(server.url, 4, 1, 4))  # warm-up
        return {name: asyncio.run(closed_loop(server.url, *case)) for name, case in CASES.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="explicit --torch-threads to compare "
                   "with the default (default: 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--output-file", default=None, help="write the raw rows as JSON here")
    args = p.parse_args(argv)
    variants: list[int | None] = [None, *args.threads]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-threads-") as log_dir:
        for neighbour in (False, True):
            stop = multiprocessing.Event()
            hog = multiprocessing.Process(target=spin, args=(stop,), daemon=True) if neighbour else None
            if hog is not None:
                hog.start()
            try:
                for rnd in range(args.rounds):
                    for threads in variants:
                        for case, (tps, p50) in measure(threads, log_dir).items():
                            rows.append({"neighbour": neighbour, "round": rnd, "threads": threads, "case": case,
                                         "tok_s": tps, "p50_ms": p50 * 1000})
            finally:
                if hog is not None:
                    stop.set()
                    hog.join(5)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average at the end {os.getloadavg()[0]:.2f}; medians of {args.rounds} rounds [min-max]")
    print("| neighbour | --torch-threads | case | tok/s | p50 ms |\n|---|---|---|---|---|")
    for neighbour in (False, True):
        for threads in variants:
            for case in CASES:
                cell = [r for r in rows if r["neighbour"] == neighbour and r["threads"] == threads and r["case"] == case]
                tps = [r["tok_s"] for r in cell]
                p50 = [r["p50_ms"] for r in cell]
                print(f"| {'busy core' if neighbour else 'idle'} | {threads or 'default'} | {case} | "
                      f"{statistics.median(tps):.0f} [{min(tps):.0f}-{max(tps):.0f}] | "
                      f"{statistics.median(p50):.1f} [{min(p50):.1f}-{max(p50):.1f}] |")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"cores": cores, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
