#!/usr/bin/env python
"""Result 3: P/D disaggregation vs colocated (mixed-mode) serving on the same machine.

Servers (all started once, measured one at a time, same worker count per setup):
(a) colocated: one mixed-mode server with ``--dp-size 2``;
(b) P/D: one prefill server (DP 1) and one decode server (DP 1).
Both sit behind ``pdserve router`` (``--worker-urls`` for (a), ``--pd-disaggregation`` for (b),
``least_load`` policies), so both pay the same router hop.

1. Load: the same seeded skewed workload (long and short prompts, mixed outputs, Poisson arrivals)
   through each setup: TTFT, ITL and TPOT percentiles, goodput, ratios P/D / colocated.
2. Single-request TTFT (issue 4): sequential streamed requests with 128- and 1024-token prompts,
   median of ``--ttft-samples``: P/D through the router, P/D direct (the client sends both halves
   with bootstrap fields itself), colocated through the router and colocated direct.
3. KV transfer throughput: ``pdserve bench transfer`` (in-order and shuffled pages), each backend's
   ratio to its ceiling measured in the same run (raw TCP socket for tcp, memcpy for shm).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from pdserve.bench.cluster import Cluster, Proc, machine_info, write_result
from pdserve.bench.datasets import sample_mixed
from pdserve.bench.metrics import parse_slo
from pdserve.bench.serving import ServingConfig, benchmark
from pdserve.cpu_threads import torch_threads_per_worker
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer
from pdserve.transfer_names import BACKENDS

LOAD_KEYS = ("request_goodput", "slo_attainment", "request_throughput", "output_throughput", "median_ttft_ms",
             "p90_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms", "median_tpot_ms",
             "p99_tpot_ms", "completed", "failed", "duration_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--long-share", type=float, default=0.2)
    p.add_argument("--long-input", type=int, nargs=2, default=(600, 900))
    p.add_argument("--short-input", type=int, nargs=2, default=(32, 64))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV tokens per DP rank, every server")
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:60"], metavar="KEY:MS")
    p.add_argument("--repeats", type=int, default=2, help="load runs per setup (interleaved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-prompt-lens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--ttft-samples", type=int, default=10)
    p.add_argument("--transfer-backend", choices=BACKENDS, default="tcp", help="of the P/D servers")
    p.add_argument("--transfer-args", default="", help="extra flags for 'pdserve bench transfer', one string")
    p.add_argument("--skip", nargs="*", default=[], choices=["load", "ttft", "transfer"])
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-file", default="benchmarks/results/pd_vs_colocated.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- single-request TTFT


async def _first_token_s(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    """Seconds from sending a streamed ``/generate`` to its first chunk carrying output."""
    start = time.perf_counter()
    async with session.post(url + "/generate", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        first = None
        async for line in resp.content:
            is_data = line.startswith(b"data:") and line.strip() != b"data: [DONE]"
            if is_data and first is None and json.loads(line[5:]).get("text") is not None:
                first = time.perf_counter() - start
        if first is None:
            raise RuntimeError("no output chunk")
        return first


async def _pd_direct_ttft(session: aiohttp.ClientSession, prefill: Proc, decode: Proc, body: dict) -> float:
    """The client pairs the halves itself, as a router would: same body, bootstrap fields, a room."""
    room = random.getrandbits(63)
    pd = dict(body, bootstrap_host="127.0.0.1", bootstrap_port=prefill.bootstrap_port, bootstrap_room=room)

    async def prefill_half() -> None:
        async with session.post(prefill.url + "/generate", json=dict(pd, stream=False)) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"prefill HTTP {resp.status}")

    task = asyncio.create_task(prefill_half())
    try:
        return await _first_token_s(session, decode.url, pd)
    finally:
        await task


async def single_ttft(paths: dict, prompt_len: int, samples: int) -> dict[str, dict]:
    body = {"input_ids": [10 + (i * 7) % 1900 for i in range(prompt_len)], "stream": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for name, fn in paths.items():
            for _ in range(2):  # warm this path and prompt length
                await fn(session, body)
            values = [await fn(session, body) * 1000 for _ in range(samples)]
            out[name] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                         "samples_ms": values}
    return out


# ---------------------------------------------------------------------- transfer


def run_transfer(args, tmp: Path) -> list[dict]:
    rows = []
    for shuffle in (False, True):
        out_file = tmp / f"transfer-{'shuffled' if shuffle else 'in-order'}.json"
        cmd = [sys.executable, "-m", "pdserve.cli", "bench", "transfer", "--output-file", str(out_file),
               *args.transfer_args.split()] + (["--shuffle"] if shuffle else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
        print(proc.stdout.rstrip(), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pdserve bench transfer failed:\n{proc.stderr[-2000:]}")
        data = json.loads(out_file.read_text())
        for row in data["rows"]:
            rows.append({**row, "pages": "shuffled" if shuffle else "in-order", "pool_mib": data["pool_mib"],
                         "page_kib": data["page_kib"]})
    return rows


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slo = parse_slo(args.goodput)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-bench-pdcolo-"))
    out: dict = {"benchmark": "pd_vs_colocated", "machine": machine_info(), "argv": sys.argv[1:],
                 "args": vars(args), "slo_ms": slo}
    t0 = time.monotonic()
    if "load" not in args.skip or "ttft" not in args.skip:
        with Cluster(log_dir, model_path=args.model_path, torch_threads=torch_threads_per_worker(2)) as cluster:
            mixed = cluster.server("mixed", None, 2, args.max_total_tokens)
            prefill = cluster.server("prefill", "prefill", 1, args.max_total_tokens, args.transfer_backend)
            decode = cluster.server("decode", "decode", 1, args.max_total_tokens, args.transfer_backend)
            cluster.wait_healthy()
            warm = (16, max(max(args.long_input), max(args.ttft_prompt_lens)))
            cluster.warm_up(mixed, 2, warm)
            cluster.warm_up_pd(prefill, decode, 1, 1, warm)
            policy = ["--policy", "least_load"]
            routers = {"colocated": cluster.pdserve_router("router-colocated", mixed=[mixed], args=policy),
                       "pd": cluster.pdserve_router("router-pd", [prefill], [decode], args=policy)}
            for r in routers.values():
                cluster.wait_serving(r)
            if "load" not in args.skip:
                out["load"] = run_load(args, slo, routers)
            if "ttft" not in args.skip:
                paths = {
                    "pd_router": lambda s, b: _first_token_s(s, routers["pd"].url, b),
                    "pd_direct": lambda s, b: _pd_direct_ttft(s, prefill, decode, b),
                    "colocated_router": lambda s, b: _first_token_s(s, routers["colocated"].url, b),
                    "colocated_direct": lambda s, b: _first_token_s(s, mixed.url, b),
                }
                out["ttft"] = {}
                for n in args.ttft_prompt_lens:
                    res = asyncio.run(single_ttft(paths, n, args.ttft_samples))
                    res["ratio_pd_router_over_colocated_router"] = (
                        res["pd_router"]["median_ms"] / res["colocated_router"]["median_ms"])
                    res["ratio_pd_direct_over_colocated_direct"] = (
                        res["pd_direct"]["median_ms"] / res["colocated_direct"]["median_ms"])
                    out["ttft"][str(n)] = res
                    print(f"[ttft {n}-token prompt, median of {args.ttft_samples}] "
                          + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in res.items() if isinstance(v, dict))
                          + f"; P/D / colocated: via router {res['ratio_pd_router_over_colocated_router']:.2f}, "
                          f"direct {res['ratio_pd_direct_over_colocated_direct']:.2f}", flush=True)
    if "transfer" not in args.skip:
        out["transfer"] = run_transfer(args, log_dir)
    out["wall_s"] = time.monotonic() - t0
    write_result(args.output_file, out)
    print(f"wrote {args.output_file} ({out['wall_s']:.0f} s)")
    return 0


def run_load(args, slo, routers: dict[str, Proc]) -> dict:
    tokenizer = Tokenizer(args.model_path or default_model_path())
    requests = sample_mixed(tokenizer, args.num_prompts, args.long_share, tuple(args.long_input),
                            tuple(args.short_input), tuple(args.output_len), args.seed)
    runs: dict[str, list[dict]] = {name: [] for name in routers}
    for rep in range(args.repeats):
        for name, router in routers.items():
            config = ServingConfig(base_url=router.url, num_prompts=len(requests), request_rate=args.request_rate,
                                   goodput=slo, seed=args.seed, warmup_requests=0, disable_tqdm=True,
                                   request_timeout_s=300.0)
            m = benchmark(config, requests).metrics
            r = {k: m[k] for k in LOAD_KEYS}
            runs[name].append(r)
            print(f"[load] {name:9s} run {rep + 1}: TTFT p50/p90/p99 {r['median_ttft_ms']:.0f}/{r['p90_ttft_ms']:.0f}/"
                  f"{r['p99_ttft_ms']:.0f} ms, ITL p50/p90/p99 {r['median_itl_ms']:.1f}/{r['p90_itl_ms']:.1f}/"
                  f"{r['p99_itl_ms']:.1f} ms, goodput {r['request_goodput']:.2f} req/s "
                  f"({r['slo_attainment']:.0%}), {r['completed']} ok / {r['failed']} failed, "
                  f"{r['duration_s']:.1f} s", flush=True)
    ratios = {}
    for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99_tpot_ms", "request_goodput"):
        p = [r[k] for r in runs["pd"] if r[k] is not None]
        c = [r[k] for r in runs["colocated"] if r[k] is not None]
        if p and c and statistics.mean(c) > 0:
            ratios[k] = statistics.mean(p) / statistics.mean(c)
    print("[load] P/D / colocated (means over runs): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
          flush=True)
    return {"runs": runs, "ratio_pd_over_colocated_of_means": ratios}


if __name__ == "__main__":
    raise SystemExit(main())
