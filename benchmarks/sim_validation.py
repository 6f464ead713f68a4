#!/usr/bin/env python
"""Validation of the profiled cost model: the real engine vs ``--simulate profile:FILE``.

1. Before each repeat, a real P/D pair (prefill DP 1, decode DP 1, ``--step-trace`` on) behind
   ``pdserve router`` serves a *calibration* workload (same distribution and rate as the test
   workload, another seed); ``pdserve bench profile --from-trace`` fits the step model from those
   served steps (profile ``served``, refitted each repeat so that it sees the machine's load of
   that moment; a fresh sim pair serves with it). With ``--profiles ... alone`` the step model is also fitted the old way,
   from an engine timed alone on the machine (``pdserve bench profile``).
2. One sim pair per profile, each behind its own ``pdserve router``, and the real pair serve the
   same seeded test workload (Poisson arrivals, mixed prompt and output lengths), interleaved,
   ``--repeats`` times.
3. Reported: TTFT and TPOT p50/p99 of each, sim/real ratios (target: p50 within 15 %, p99 within
   30 %), the real engine's own repeat spread, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.bench.cluster import Cluster, machine_info, write_result
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.serving import ServingConfig, benchmark
from pdserve.engine.step_trace import read_trace, trace_path

KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
# no prefix cache: every repeat serves the same prompts, and the profile is fitted without cache hits
ENGINE = ["--torch-threads", "1", "--max-total-tokens", "8192", "--chunked-prefill-size", "512"]
SERVER = [*ENGINE, "--disable-radix-cache"]
PROFILES = ("served", "alone")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=30, help="requests per run (default: 30)")
    p.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals, requests/s (default: 1)")
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 400), help="prompt tokens, min max (default: 32 400)")
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 48), help="output tokens, min max (default: 16 48)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="test workload seed; calibration uses seed + 1000 (default: 0)")
    p.add_argument("--profiles", nargs="+", choices=PROFILES, default=["served"],
                   help="step models to validate: served (fitted from the real pair's step traces under the "
                        "calibration workload), alone (an engine timed alone) (default: served)")
    p.add_argument("--output-file", default="benchmarks/results/sim_validation.json", help="JSON result (default: %(default)s)")
    return p.parse_args(argv)


def workload(seed: int, args) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest("", [rng.randrange(10, 1000) for _ in range(rng.randint(*args.input_len))],
                         rng.randint(*args.output_len)) for _ in range(args.num_prompts)]


def run_once(url: str, requests: list[BenchRequest], rate: float, seed: int) -> dict:
    config = ServingConfig(base_url=url, backend="pdserve", num_prompts=len(requests), request_rate=rate,
                           seed=seed, warmup_requests=0, disable_tqdm=True)
    m = benchmark(config, requests).metrics
    return {k: m[k] for k in KEYS} | {"completed": m["completed"], "failed": m["failed"],
                                      "load_average": os.getloadavg()[0]}


def window(prefixes: list[Path], start: float, end: float, out: Path) -> list[str]:
    """Copy the steps of each trace that started within [start, end] (the calibration run) to ``out``."""
    files = []
    for prefix in prefixes:
        header, steps = read_trace(trace_path(str(prefix), 0))
        path = out / f"{prefix.name}.calibration.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [header, *(s for s in steps if start <= s["start"] <= end)]))
        files.append(str(path))
    return files


def fit_profile(output: Path, extra: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "profile", "--output", str(output), *ENGINE,
                    *extra], check=True, stdout=subprocess.DEVNULL)
    return json.loads(output.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdserve-sim-validation-"))
    test = workload(args.seed, args)
    profiles: dict[str, list[dict]] = {}
    results: dict[str, list[dict]] = {"real": []}
    calibration: list[dict] = []
    with Cluster(work / "logs") as c:
        traces = [work / "trace-p", work / "trace-d"]
        p = c.server("real-p", "prefill", 1, extra=[*SERVER, "--step-trace", str(traces[0])])
        d = c.server("real-d", "decode", 1, extra=[*SERVER, "--step-trace", str(traces[1])])
        c.wait_healthy(timeout=300)
        c.warm_up_pd(p, d, 1, 1, (16, 400))
        real = c.pdserve_router("r-real", [p], [d])
        c.wait_serving(real)

        def sim_pair(name: str, profile: Path):
            extra = [*SERVER, "--simulate", f"profile:{profile}"]
            sp = c.server(f"sim-{name}-p", "prefill", 1, transfer_backend="sim", extra=extra)
            sd = c.server(f"sim-{name}-d", "decode", 1, transfer_backend="sim", extra=extra)
            c.wait_healthy([sp, sd], timeout=300)
            router = c.pdserve_router(f"r-sim-{name}", [sp], [sd])
            c.wait_serving(router)
            return [sp, sd, router]

        alone = None
        if "alone" in args.profiles:
            profiles["alone"] = [fit_profile(work / "alone.json", [
                "--batch-sizes", "1,2,4,8", "--prompt-len", f"{args.input_len[0]},{args.input_len[1]}",
                "--output-len", "24", "--repeats", "2"])]
            alone = sim_pair("alone", work / "alone.json")
            results["sim-alone"] = []
        for rep in range(args.repeats):
            served = None
            if "served" in args.profiles:
                # calibrate right before each repeat, so the profile sees the machine's load of that moment
                seed = args.seed + 1000 + rep
                start = time.monotonic()
                calibration.append(run_once(real.url, workload(seed, args), args.request_rate, seed))
                files = window(traces, start, time.monotonic(), work)
                profile = work / f"served-{rep}.json"
                profiles.setdefault("served", []).append(fit_profile(profile, ["--from-trace", *files]))
                served = sim_pair(f"served-{rep}", profile)
                results.setdefault("sim-served", [])
            sides = [("real", real), *([("sim-served", served[2])] if served else []),
                     *([("sim-alone", alone[2])] if alone else [])]
            for name, router in sides:
                row = run_once(router.url, test, args.request_rate, args.seed + rep)
                results[name].append(row)
                print(f"{name:10s} run {rep + 1}: " + ", ".join(f"{k} {row[k]:.1f}" for k in KEYS)
                      + f" (load average {row['load_average']:.2f})", flush=True)
            if served:
                c.stop(*served)
        for name, fitted in profiles.items():
            for prof in fitted:
                print(f"profile {name}: coefficients {prof['coefficients']}, fit error {prof['fit_error']}")

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[name])

    ratios = {name: {k: mean(name, k) / mean("real", k) for k in KEYS} for name in results if name != "real"}
    # each side's own repeat-to-repeat spread, to read the sim error against
    spread = {name: {k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / mean(name, k) for k in KEYS}
              for name, rows in results.items()}
    for name, r in ratios.items():
        print(f"{name} / real (means over runs): " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    print("real engine's own spread, (max - min) / mean over its runs: "
          + ", ".join(f"{k} {v:.0%}" for k, v in spread["real"].items()))
    write_result(args.output_file, {"benchmark": "sim_validation", "machine": machine_info(), "args": vars(args),
                                    "profiles": profiles, "calibration_runs": calibration, "runs": results,
                                    "ratio_sim_over_real": ratios, "spread": spread})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
