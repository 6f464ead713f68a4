#!/usr/bin/env python
"""Validation of the profiled cost model: the real engine vs ``--simulate profile:FILE``.

1. ``pdserve bench profile`` fits the step model on this machine (tiny model, the servers' flags).
2. A real P/D pair (prefill DP 1, decode DP 1) and a sim pair with that profile, each behind its
   own ``pdserve router``, serve the same seeded workload (Poisson arrivals, mixed prompt and
   output lengths), interleaved, ``--repeats`` times.
3. Reported: TTFT and TPOT p50/p99 of each, and sim/real ratios (target: p50 within 15 %, p99
   within 30 %).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pdserve.bench.cluster import Cluster, machine_info, write_result
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.serving import ServingConfig, benchmark

KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
# no prefix cache: every repeat serves the same prompts, and the profile is fitted without cache hits
ENGINE = ["--torch-threads", "1", "--max-total-tokens", "8192", "--chunked-prefill-size", "512"]
SERVER = [*ENGINE, "--disable-radix-cache"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=30, help="requests per run (default: 30)")
    p.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals, requests/s (default: 1)")
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 400), help="prompt tokens, min max (default: 32 400)")
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 48), help="output tokens, min max (default: 16 48)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--profile", default=None, help="reuse this profile instead of measuring one (default: measure)")
    p.add_argument("--output-file", default="benchmarks/results/sim_validation.json", help="JSON result (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdserve-sim-validation-"))
    profile = args.profile or str(work / "profile.json")
    if args.profile is None:
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "profile", "--output", profile, *ENGINE,
                        "--batch-sizes", "1,2,4,8", "--prompt-len", f"{args.input_len[0]},{args.input_len[1]}",
                        "--output-len", "24", "--repeats", "2"], check=True)
    rng = random.Random(args.seed)
    requests = [BenchRequest("", [rng.randrange(10, 1000) for _ in range(rng.randint(*args.input_len))],
                             rng.randint(*args.output_len)) for _ in range(args.num_prompts)]
    results: dict[str, list[dict]] = {"real": [], "sim": []}
    with Cluster(work / "logs") as c:
        fleets = {}
        for name, extra, backend in (("real", [], "tcp"), ("sim", ["--simulate", f"profile:{profile}"], "sim")):
            p = c.server(f"{name}-p", "prefill", 1, transfer_backend=backend, extra=[*SERVER, *extra])
            d = c.server(f"{name}-d", "decode", 1, transfer_backend=backend, extra=[*SERVER, *extra])
            fleets[name] = (p, d)
        c.wait_healthy(timeout=300)
        for name, (p, d) in fleets.items():
            if name == "real":
                c.warm_up(p, 1, (16, 400))
                c.warm_up(d, 1, (16, 400))
        routers = {name: c.pdserve_router(f"r-{name}", [p], [d]) for name, (p, d) in fleets.items()}
        for r in routers.values():
            c.wait_serving(r)
        for rep in range(args.repeats):
            for name, router in routers.items():
                config = ServingConfig(base_url=router.url, backend="pdserve", num_prompts=len(requests),
                                       request_rate=args.request_rate, seed=args.seed + rep, warmup_requests=0,
                                       disable_tqdm=True)
                m = benchmark(config, requests).metrics
                row = {k: m[k] for k in KEYS} | {"completed": m["completed"], "failed": m["failed"],
                                                 "load_average": os.getloadavg()[0]}
                results[name].append(row)
                print(f"{name:4s} run {rep + 1}: " + ", ".join(f"{k} {row[k]:.1f}" for k in KEYS)
                      + f" (load average {row['load_average']:.1f})", flush=True)
    ratios = {k: statistics.mean(r[k] for r in results["sim"]) / statistics.mean(r[k] for r in results["real"])
              for k in KEYS}
    # the real engine's own repeat-to-repeat spread, to read the sim error against
    spread = {k: (max(r[k] for r in results["real"]) - min(r[k] for r in results["real"]))
              / statistics.mean(r[k] for r in results["real"]) for k in KEYS}
    print("sim / real (means over runs): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("real engine's own spread, (max - min) / mean over its runs: "
          + ", ".join(f"{k} {v:.0%}" for k, v in spread.items()))
    write_result(args.output_file, {"benchmark": "sim_validation", "machine": machine_info(), "args": vars(args),
                                    "profile": Path(profile).read_text(), "runs": results, "ratio_sim_over_real": ratios,
                                    "real_spread": spread})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
