#!/usr/bin/env python
"""How big a simulated fleet this machine holds: N prefill + N decode sim servers with DP D each.

Measures the time until every server answers /health, the resident memory (RSS) of every process
of the fleet (fronts and sim hosts; routers excluded), serves a batch of requests through
``pdserve router`` and reports the step timing drift: the TPOT measured against the cost model's
decode step at that batch. Target (issue 14): 4 + 4 servers x DP 8 = 64 ranks, < 4 GiB, < 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.bench.cluster import Cluster, machine_info, write_result
from pdserve.sim.cost_model import StepShape
from pdserve.sim.hardware import get_hardware
from pdserve.sim.model_shape import ModelShape
from pdserve.sim.roofline import RooflineCost

MODELS = Path(__file__).resolve().parent / "sim_models"


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--servers", type=int, default=4, help="prefill servers, and as many decode servers (default: 4)")
    p.add_argument("--dp-size", type=int, default=8, help="DP ranks per server (default: 8)")
    p.add_argument("--requests", type=int, default=128, help="requests served after start-up (default: 128)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (default: 64)")
    p.add_argument("--time-scale", type=float, default=1.0, help="--time-scale of the servers (default: 1)")
    p.add_argument("--output-file", default="benchmarks/results/sim_scale.json", help="JSON result (default: %(default)s)")
    args = p.parse_args(argv)
    model = MODELS / "llama-3.1-8b"
    sim = ["--simulate", "H100-SXM", "--model-path", str(model), "--time-scale", str(args.time_scale)]
    with Cluster(tempfile.mkdtemp(prefix="pdserve-sim-scale-")) as c:
        start = time.monotonic()
        servers = [c.server(f"p{i}", "prefill", args.dp_size, transfer_backend="sim", extra=sim)
                   for i in range(args.servers)]
        servers += [c.server(f"d{i}", "decode", args.dp_size, transfer_backend="sim", extra=sim)
                    for i in range(args.servers)]
        c.wait_healthy(timeout=600)
        startup = time.monotonic() - start
        rss = rss_bytes([pid for s in servers for pid in s.group_pids()])
        front_pids = [s.pid for s in servers]
        host_pids = [pid for s in servers for pid in s.group_pids() if pid != s.pid]
        split = {"front_cpu_s": sum(s.cpu_seconds() for s in servers),
                 "host_cpu_s": sum(s.cpu_seconds(whole_group=True) - s.cpu_seconds() for s in servers),
                 "front_rss_gib": rss_bytes(front_pids) / 2**30, "host_rss_gib": rss_bytes(host_pids) / 2**30,
                 "load_average": os.getloadavg()}
        ranks = 2 * args.servers * args.dp_size
        print(f"{ranks} sim ranks in {len(servers)} servers: healthy in {startup:.1f} s, RSS {rss / 2**30:.2f} GiB "
              f"(fronts {split['front_rss_gib']:.2f}, sim hosts {split['host_rss_gib']:.2f}); start-up CPU: fronts "
              f"{split['front_cpu_s']:.1f} s, sim hosts {split['host_cpu_s']:.1f} s; load average "
              f"{split['load_average'][0]:.1f}", flush=True)
        router = c.pdserve_router("r", servers[:args.servers], servers[args.servers:], args=["--policy", "round_robin"])
        c.wait_healthy([router])
        time.sleep(3)

        async def load():
            async with httpx.AsyncClient(base_url=router.url, timeout=300,
                                         limits=httpx.Limits(max_connections=None)) as client:
                t = time.monotonic()
                rs = await asyncio.gather(*(client.post("/generate", json={
                    "input_ids": list(range(100, 612)), "sampling_params": {
                        "max_new_tokens": args.output_len, "ignore_eos": True}}) for _ in range(args.requests)))
                return rs, time.monotonic() - t

        cpu0 = sum(s.cpu_seconds(whole_group=True) for s in servers)
        rs, wall = asyncio.run(load())
        cpu = sum(s.cpu_seconds(whole_group=True) for s in servers) - cpu0
        ok = [r.json()["meta_info"] for r in rs if r.status_code == 200]
        tpot = [(m["e2e_latency"] - m["ttft"]) / (m["completion_tokens"] - 1) for m in ok]
        per_rank = args.requests / (args.servers * args.dp_size)
        cost = RooflineCost(ModelShape.from_folder(model), get_hardware("H100-SXM"))
        modelled = cost.step_seconds(StepShape([512 + args.output_len // 2] * max(1, round(per_rank)))) * args.time_scale
        steps = len(ok) * args.output_len
        result = {"machine": machine_info(), "args": vars(args), "ranks": ranks, "startup_s": startup,
                  "rss_gib": rss / 2**30, **split, "ok": len(ok), "wall_s": wall, "server_cpu_s": cpu,
                  "tpot_ms_median": statistics.median(tpot) * 1e3, "tpot_ms_modelled": modelled * 1e3,
                  "drift": statistics.median(tpot) / modelled - 1,
                  "server_cpu_ms_per_token": cpu / steps * 1e3}
        print(f"{len(ok)}/{args.requests} ok in {wall:.1f} s; TPOT median {result['tpot_ms_median']:.2f} ms vs "
              f"modelled {result['tpot_ms_modelled']:.2f} ms (drift {result['drift']:+.0%}); server CPU "
              f"{cpu:.1f} s = {result['server_cpu_ms_per_token']:.3f} ms per generated token", flush=True)
        write_result(args.output_file, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
