#!/usr/bin/env python
"""Prefix cache: the ``generated-shared-prefix`` workload with the cache vs ``--disable-radix-cache``.

Two mixed servers (DP 1 each, same KV size) are started once; the same seeded workload (groups of
questions behind long shared system prompts, interleaved, Poisson arrivals) runs through each, one
after the other. Printed per setup: TTFT p50/p99, prefill tokens the server computed (from
``/get_load``'s ``prefill_tokens_computed`` before and after) and the cache hit rate; then the
ratios no-cache / cache. ``--repeats N`` runs the pair N times (the cache server's cache flushed
before each, the order alternating) and prints each run's ratios and their spread. Numbers, not
pass/fail.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request

from pdserve.bench.cluster import Cluster, Proc, machine_info, write_result
from pdserve.bench.datasets import sample_shared_prefix
from pdserve.bench.serving import ServingConfig, benchmark
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of the pair (default: 1)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def load(proc: Proc) -> dict:
    with urllib.request.urlopen(proc.url + "/get_load", timeout=30) as resp:
        (rank,) = json.load(resp)
    return rank


def flush(proc: Proc) -> None:
    req = urllib.request.Request(proc.url + "/flush_cache", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def ratios(on: dict, off: dict) -> dict:
    return {
        "prefill_tokens_no_cache_over_cache": round(off["prefill_tokens_computed"] / max(1, on["prefill_tokens_computed"]), 2),
        "ttft_p50_no_cache_over_cache": round(off["median_ttft_ms"] / max(1e-9, on["median_ttft_ms"]), 2),
        "ttft_p99_no_cache_over_cache": round(off["p99_ttft_ms"] / max(1e-9, on["p99_ttft_ms"]), 2),
    }


def run_setup(proc: Proc, requests, args) -> dict:
    before = load(proc)
    config = ServingConfig(base_url=proc.url, request_rate=args.request_rate, seed=args.seed, disable_tqdm=True,
                           warmup_requests=0)
    result = benchmark(config, requests)
    metrics = result.metrics
    after = load(proc)
    computed = after["prefill_tokens_computed"] - before["prefill_tokens_computed"]
    prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    return {
        "median_ttft_ms": metrics["median_ttft_ms"],
        "p99_ttft_ms": metrics["p99_ttft_ms"],
        "completed": metrics["completed"],
        "prefill_tokens_computed": computed,
        "prompt_tokens": prompt,
        "cache_hit_rate": round(1 - computed / max(1, prompt), 3),  # of this run (the server's is cumulative)
        "errors": sorted({r.error for r in result.records if not r.success})[:5],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model_path or default_model_path()
    requests = sample_shared_prefix(Tokenizer(model), args.groups, args.per_group, args.system_len,
                                    args.question_len, args.output_len, args.seed)
    result: dict = {"machine": machine_info(), "args": vars(args), "setups": {}}
    with tempfile.TemporaryDirectory() as logs, Cluster(logs, args.model_path, torch_threads=args.torch_threads) as c:
        servers = {
            "cache": c.server("cache", max_total_tokens=args.max_total_tokens),
            "no_cache": c.server("no_cache", max_total_tokens=args.max_total_tokens, extra=["--disable-radix-cache"]),
        }
        c.wait_healthy()
        result["runs"] = []
        for run in range(args.repeats):
            flush(servers["cache"])
            order = list(servers) if run % 2 == 0 else list(servers)[::-1]
            setups = {}
            for name in order:
                setups[name] = run_setup(servers[name], requests, args)
                print(run, name, json.dumps(setups[name]), flush=True)
            setups["ratios"] = ratios(setups["cache"], setups["no_cache"])
            print(run, "ratios", json.dumps(setups["ratios"]), flush=True)
            result["runs"].append(setups)
    result["setups"] = {k: v for k, v in result["runs"][0].items() if k != "ratios"}
    result["ratios"] = result["runs"][0]["ratios"]
    for key in result["ratios"]:
        values = [r["ratios"][key] for r in result["runs"]]
        result.setdefault("spread", {})[key] = {"min": min(values), "max": max(values)}
    print("spread", json.dumps(result.get("spread")))
    if args.output:
        write_result(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
