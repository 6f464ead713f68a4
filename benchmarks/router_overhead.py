#!/usr/bin/env python
"""Result 2: router overhead, ``pdserve router`` vs sglang-router 0.3.2 in PD mode, same servers.

One prefill and one decode server (DP 1 each, the tiny model) serve tiny requests (4-token prompt,
1 new token, non-streaming) so the path, not the model, dominates. Three ways in, one after the
other against the same servers:

- ``direct``: the benchmark client does the router's job itself: it sends the prefill and the
  decode half concurrently with ``bootstrap_host``/``bootstrap_port`` and a fresh random
  ``bootstrap_room`` and waits for both;
- ``pdserve``: through ``pdserve router`` (``--policy round_robin``, ``--log-level warn``);
- ``sglang``: through sglang-router 0.3.2 (``--pd-disaggregation``, ``--policy round_robin``,
  ``--log-level warn``; loopback only, never ``--dp-aware``).

Closed loop at each ``--concurrency`` level: latency p50/p99, achieved requests/s, added latency
over ``direct`` (same level), and the router process's CPU seconds per 1000 requests (utime +
stime from /proc/<pid>/stat). With ``--stub`` (on by default) the same is repeated against very
fast STUB upstreams (``pdserve.bench.stub_server``: reply at once, no model) to isolate router
cost; those rows are labelled ``stub``. Everything (client, routers, servers) shares this
machine's cores, so req/s is a ceiling of the whole loop, not of the router alone.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from pdserve.bench.cluster import Cluster, Proc, machine_info, write_result
from pdserve.router.launch import threads_for

TARGETS = ("direct", "pdserve", "sglang")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=300, help="timed requests per (target, concurrency)")
    p.add_argument("--stub-requests", type=int, default=2000, help="the same against stub upstreams")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--no-real", action="store_true", help="skip the real pdserve servers")
    p.add_argument("--no-stub", action="store_true", help="skip the stub-upstream variant")
    p.add_argument("--model-path", default=None)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-file", default="benchmarks/results/router_overhead.json")
    return p.parse_args(argv)


class Target:
    """How one request is sent: through a router URL, or both halves directly."""

    def __init__(self, name: str, prefill: Proc, decode: Proc, router: Proc | None, new_tokens: int) -> None:
        self.name, self.prefill, self.decode, self.router = name, prefill, decode, router
        self.body = {"input_ids": [11, 12, 13, 14], "stream": False,
                     "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}

    async def one(self, session: aiohttp.ClientSession) -> bool:
        if self.router is not None:
            async with session.post(self.router.url + "/generate", json=self.body) as resp:
                await resp.read()
                return resp.status == 200
        body = dict(self.body, bootstrap_host="127.0.0.1", bootstrap_port=self.prefill.bootstrap_port,
                    bootstrap_room=random.getrandbits(63))

        async def half(url: str) -> bool:
            async with session.post(url + "/generate", json=body) as resp:
                await resp.read()
                return resp.status == 200

        ok_p, ok_d = await asyncio.gather(half(self.prefill.url), half(self.decode.url))
        return ok_p and ok_d


async def closed_loop(target: Target, concurrency: int, total: int, warmup: int) -> dict:
    connector = aiohttp.TCPConnector(limit=2 * concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(warmup):
            await target.one(session)
        latencies: list[float] = []
        failures = 0
        issued = 0
        cpu0 = target.router.cpu_seconds(whole_group=True) if target.router else None

        async def worker() -> None:
            nonlocal issued, failures
            while issued < total:
                issued += 1
                t = time.perf_counter()
                try:
                    ok = await target.one(session)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - t)
                failures += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu1 = target.router.cpu_seconds(whole_group=True) if target.router else None
    ms = np.asarray(latencies) * 1000
    row = {"target": target.name, "concurrency": concurrency, "requests": len(latencies), "failures": failures,
           "req_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
           "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}
    if cpu0 is not None:
        row["router_cpu_s_per_1000"] = (cpu1 - cpu0) / len(latencies) * 1000
    return row


def measure(cluster: Cluster, prefill: Proc, decode: Proc, args, total: int, label: str) -> list[dict]:
    rows = []
    for name in args.targets:
        router = None
        if name == "pdserve":
            router = cluster.pdserve_router(f"{label}-pdserve-router", [prefill], [decode],
                                            args=["--policy", "round_robin"])
        elif name == "sglang":
            router = cluster.sglang_router(f"{label}-sglang-router", [prefill], [decode],
                                           args=["--policy", "round_robin"])
        try:
            if router is not None:
                cluster.wait_serving(router, timeout=90.0)
            target = Target(name, prefill, decode, router, args.max_new_tokens)
            for c in args.concurrency:
                row = asyncio.run(closed_loop(target, c, total, args.warmup))
                row["upstreams"] = label
                rows.append(row)
                cpu = row.get("router_cpu_s_per_1000")
                print(f"[{label}] {name:8s} c={c:<3d} {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                      f"p99 {row['p99_ms']:7.2f} ms  failures {row['failures']}"
                      + (f"  router CPU {cpu * 1000:.0f} ms per 1000 req" if cpu is not None else ""), flush=True)
        finally:
            if router is not None:
                cluster.stop(router)
    # ratios against direct at the same concurrency
    direct = {r["concurrency"]: r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = direct.get(r["concurrency"])
        if d is not None and r["target"] != "direct":
            r["added_p50_ms"] = r["p50_ms"] - d["p50_ms"]
            r["added_p99_ms"] = r["p99_ms"] - d["p99_ms"]
            r["req_per_s_vs_direct"] = r["req_per_s"] / d["req_per_s"]
    by = {(r["target"], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        p, s = by.get(("pdserve", c)), by.get(("sglang", c))
        if p and s:
            p["req_per_s_vs_sglang"] = p["req_per_s"] / s["req_per_s"]
            p["p50_vs_sglang"] = p["p50_ms"] / s["p50_ms"]
            print(f"[{label}] c={c}: pdserve/sglang req/s {p['req_per_s_vs_sglang']:.2f}, p50 latency "
                  f"{p['p50_vs_sglang']:.2f}; added p50 over direct: pdserve {p.get('added_p50_ms', 0):.2f} ms, "
                  f"sglang {s.get('added_p50_ms', 0):.2f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-bench-router-"))
    out: dict = {"benchmark": "router_overhead", "machine": machine_info(), "argv": sys.argv[1:],
                 "args": vars(args), "rows": []}
    t0 = time.monotonic()
    if not args.no_real:
        with Cluster(log_dir / "real", model_path=args.model_path, torch_threads=threads_for(2)) as cluster:
            prefill = cluster.server("prefill", "prefill", 1, 8192)
            decode = cluster.server("decode", "decode", 1, 8192)
            cluster.wait_healthy()
            cluster.warm_up(prefill, 1, (4, 64))
            cluster.warm_up(decode, 1, (4, 64))
            out["rows"] += measure(cluster, prefill, decode, args, args.requests, "real")
    if not args.no_stub:
        with Cluster(log_dir / "stub") as cluster:
            prefill, decode = cluster.stub("stub-prefill", "prefill"), cluster.stub("stub-decode", "decode")
            cluster.wait_healthy()
            out["rows"] += measure(cluster, prefill, decode, args, args.stub_requests, "stub")
    out["wall_s"] = time.monotonic() - t0
    write_result(args.output_file, out)
    print(f"wrote {args.output_file} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
