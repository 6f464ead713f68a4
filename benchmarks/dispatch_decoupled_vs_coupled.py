#!/usr/bin/env python
"""Result 1: decoupled vs coupled DP dispatch behind ``pdserve router``.

For each topology (prefill DP x decode DP, default ``2x4`` and ``4x2``) one prefill and one decode
server are started; the decode server's KV capacity per rank is small (``--decode-max-total-tokens``)
so that it binds. Then, back to back on the same servers with the same seeded workload, a router
with ``--prefill-policy least_load --decode-policy least_load`` (decoupled) and the same with
``--dp-coupled`` serve a skewed stream (20 % long prompts, 80 % short, mixed outputs, Poisson
arrivals). Each configuration runs ``--repeats`` times, interleaved (D, C, D, C). Reported: goodput
under the stated SLOs, SLO attainment, p50/p99 TTFT and TPOT, and decoupled / coupled ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdserve.bench.cluster import Cluster, machine_info, write_result
from pdserve.bench.datasets import sample_mixed
from pdserve.bench.metrics import parse_slo
from pdserve.bench.serving import ServingConfig, benchmark
from pdserve.cpu_threads import torch_threads_per_worker
from pdserve.models.tiny import default_model_path
from pdserve.models.tokenizer import Tokenizer

KEYS = ("request_goodput", "slo_attainment", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "completed", "failed", "duration_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topologies", nargs="+", default=["2x4", "4x2"], help="PREFILL_DPxDECODE_DP")
    p.add_argument("--model-path", default=None, help="default: the embedded tiny model")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=6.0)
    p.add_argument("--long-share", type=float, default=0.2)
    p.add_argument("--long-input", type=int, nargs=2, default=(600, 900))
    p.add_argument("--short-input", type=int, nargs=2, default=(32, 64))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--decode-max-total-tokens", type=int, default=3072, help="KV tokens per decode DP rank")
    p.add_argument("--prefill-max-total-tokens", type=int, default=16384, help="KV tokens per prefill DP rank")
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:60"], metavar="KEY:MS")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transfer-backend", choices=("tcp", "shm"), default="tcp")
    p.add_argument("--verbose", action="store_true", help="print every request's timing")
    p.add_argument("--log-dir", default=None, help="server and router logs (default: a temporary folder)")
    p.add_argument("--output-file", default="benchmarks/results/dispatch_decoupled_vs_coupled.json")
    return p.parse_args(argv)


def run_config(cluster: Cluster, prefill, decode, coupled: bool, requests, args, slo, tag: str) -> dict:
    router_args = ["--prefill-policy", "least_load", "--decode-policy", "least_load",
                   "--load-poll-interval-secs", "0.5"]
    if coupled:
        router_args.append("--dp-coupled")
    router = cluster.pdserve_router(f"router-{tag}", [prefill], [decode], args=router_args)
    try:
        cluster.wait_serving(router)
        config = ServingConfig(base_url=router.url, backend="pdserve", num_prompts=len(requests),
                               request_rate=args.request_rate, goodput=slo, seed=args.seed,
                               warmup_requests=0, disable_tqdm=True, request_timeout_s=300.0)
        result = benchmark(config, requests)
    finally:
        cluster.stop(router)
    m = result.metrics
    if args.verbose:
        for r in sorted(result.records, key=lambda r: r.index):
            print(f"    req {r.index}: in {r.prompt_len} out {r.output_len} start {r.start:.2f} ttft {r.ttft*1000:.0f} "
                  f"latency {r.latency*1000:.0f} maxgap {max(r.itl, default=0)*1000:.0f} {r.error[:80]}")
    errors = sorted({r.error[:120] for r in result.records if not r.success})
    return {**{k: m[k] for k in KEYS}, "errors": errors}


def fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) and abs(x) < 10 else (f"{x:.1f}" if isinstance(x, float) else str(x))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slo = parse_slo(args.goodput)
    tokenizer = Tokenizer(args.model_path or default_model_path())
    requests = sample_mixed(tokenizer, args.num_prompts, args.long_share, tuple(args.long_input),
                            tuple(args.short_input), tuple(args.output_len), args.seed)
    out: dict = {"benchmark": "dispatch_decoupled_vs_coupled", "machine": machine_info(),
                 "argv": sys.argv[1:], "args": vars(args), "slo_ms": slo, "topologies": []}
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-bench-dispatch-")
    print(f"workload: {args.num_prompts} requests, {args.long_share:.0%} prompts {args.long_input[0]}-"
          f"{args.long_input[1]} tokens, rest {args.short_input[0]}-{args.short_input[1]}; outputs "
          f"{args.output_len[0]}-{args.output_len[1]}; Poisson {args.request_rate} req/s, seed {args.seed}; "
          f"SLO {', '.join(f'{k} <= {v:g} ms' for k, v in slo.items())}; logs in {log_dir}", flush=True)
    t0 = time.monotonic()
    for topo in args.topologies:
        p_dp, d_dp = (int(x) for x in topo.lower().split("x"))
        with Cluster(Path(log_dir) / topo, model_path=args.model_path,
                     torch_threads=torch_threads_per_worker(p_dp + d_dp)) as cluster:
            prefill = cluster.server("prefill", "prefill", p_dp, args.prefill_max_total_tokens, args.transfer_backend)
            decode = cluster.server("decode", "decode", d_dp, args.decode_max_total_tokens, args.transfer_backend)
            cluster.wait_healthy()
            cluster.warm_up_pd(prefill, decode, p_dp, d_dp, (16, max(args.long_input)))
            runs: dict[str, list[dict]] = {"decoupled": [], "coupled": []}
            for rep in range(args.repeats):
                for name in ("decoupled", "coupled"):
                    r = run_config(cluster, prefill, decode, name == "coupled", requests, args, slo, f"{name}-{rep}")
                    runs[name].append(r)
                    print(f"[P{p_dp}xD{d_dp}] {name:9s} run {rep + 1}: goodput {fmt(r['request_goodput'])} req/s "
                          f"(attainment {r['slo_attainment']:.0%}), TTFT p50/p99 {fmt(r['median_ttft_ms'])}/"
                          f"{fmt(r['p99_ttft_ms'])} ms, TPOT p50/p99 {fmt(r['median_tpot_ms'])}/"
                          f"{fmt(r['p99_tpot_ms'])} ms, {r['completed']} ok / {r['failed']} failed, "
                          f"{r['duration_s']:.1f} s", flush=True)
                    for e in r["errors"]:
                        print(f"    error: {e}")
        ratios = {}
        for k in ("request_goodput", "slo_attainment", "p99_ttft_ms", "p99_tpot_ms", "median_ttft_ms"):
            d = [r[k] for r in runs["decoupled"] if r[k] is not None]
            c = [r[k] for r in runs["coupled"] if r[k] is not None]
            if d and c and statistics.mean(c) > 0:
                ratios[k] = statistics.mean(d) / statistics.mean(c)
        out["topologies"].append({"prefill_dp": p_dp, "decode_dp": d_dp, "runs": runs,
                                  "ratio_decoupled_over_coupled_of_means": ratios})
        print(f"[P{p_dp}xD{d_dp}] decoupled / coupled (means over runs): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    out["wall_s"] = time.monotonic() - t0
    write_result(args.output_file, out)
    print(f"wrote {args.output_file} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
