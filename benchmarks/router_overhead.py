#!/usr/bin/env python
"""Result 2: router overhead, ``pdserve router`` vs sglang-router 0.3.2 in PD mode, same servers;
and the server front's own cost on a kept-alive connection.

One prefill and one decode server (DP 1 each, the tiny model) serve tiny requests (4-token prompt,
1 new token, non-streaming) so the path, not the model, dominates. Three ways in, one after the
other against the same servers:

- ``direct``: the benchmark client does the router's job itself: it sends the prefill and the
  decode half concurrently with ``bootstrap_host``/``bootstrap_port`` and a fresh random
  ``bootstrap_room`` and waits for both;
- ``pdserve``: through ``pdserve router`` (``--policy round_robin``, ``--log-level warn``);
- ``pdserve-2p``: the same with ``--router-processes 2`` (two processes on the one port);
- ``sglang``: through sglang-router 0.3.2 (``--pd-disaggregation``, ``--policy round_robin``,
  ``--log-level warn``; loopback only, never ``--dp-aware``).

Closed loop at each ``--concurrency`` level, each client on its own **kept-alive** connection(s)
as every real client keeps them (``--fresh-connections`` opens one per request instead), with a
lean raw-asyncio client (:mod:`pdserve.bench.keepalive_client`) that is not the bottleneck:
latency p50/p99, achieved requests/s, added latency over ``direct`` (same level), and the router
process's CPU per 1000 requests (utime + stime from /proc/<pid>/stat). With ``--stub`` (on by
default) the same is repeated against very fast STUB upstreams (``pdserve.bench.stub_server``: a
bare httptools protocol that answers at once, no model) to isolate router cost; those rows are
labelled ``stub``. Everything (client, routers, servers) shares this machine's cores, so req/s is
a ceiling of the whole loop, not of the router alone.

``front`` rows (real servers only): one client, ``/generate`` of 1 token to a mixed server on a
kept-alive connection and on fresh connections, and P/D (direct) vs mixed on the same kept-alive
client: the kept-alive/fresh p50 ratio (a Nagle stall shows as ~40 ms), streamed TTFT of P/D over
mixed, and the offline engine's own 1-token ``generate`` in this process (the step's cost without
HTTP, ZMQ or another process) as the floor the mixed server's kept-alive figure is compared with.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pdserve.bench.cluster import Cluster, Proc, machine_info, write_result
from pdserve.bench.keepalive_client import (
    Endpoint,
    direct_pd_sender,
    router_sender,
    run_closed_loop,
    ttft_sender,
)
from pdserve.cpu_threads import torch_threads_per_worker

TARGETS = ("direct", "pdserve", "pdserve-2p", "sglang")
BODY = {"input_ids": [11, 12, 13, 14], "stream": False,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1000, help="timed requests per (target, concurrency)")
    p.add_argument("--stub-requests", type=int, default=10000, help="the same against stub upstreams")
    p.add_argument("--front-requests", type=int, default=300, help="timed requests per front row")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--pdserve-args", default="", help="extra flags for pdserve router, one string")
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--fresh-connections", action="store_true",
                   help="a new connection per request (the default keeps each client's connections alive)")
    p.add_argument("--no-real", action="store_true", help="skip the real pdserve servers")
    p.add_argument("--no-stub", action="store_true", help="skip the stub-upstream variant")
    p.add_argument("--model-path", default=None)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-file", default="benchmarks/results/router_overhead.json")
    p.add_argument("--baseline-tree", default=None,
                   help="front rows only: also run a P/D pair from this source tree (its PYTHONPATH), "
                        "interleaved with this tree's, for a before/after P/D TTFT in the same run")
    p.add_argument("--front-only", action="store_true", help="real servers: the front rows only")
    return p.parse_args(argv)


def body(args: argparse.Namespace) -> dict:
    return {**BODY, "sampling_params": {**BODY["sampling_params"], "max_new_tokens": args.max_new_tokens}}


def one_row(name: str, prefill: Proc, decode: Proc, router: Proc | None, args: argparse.Namespace,
            concurrency: int, total: int) -> dict:
    if router is not None:
        endpoints, send = router_sender(Endpoint(router.url), "/generate", body(args))
    else:
        endpoints, send = direct_pd_sender(Endpoint(prefill.url), Endpoint(decode.url), prefill.bootstrap_port,
                                           "/generate", body(args))
    cpu0 = router.cpu_seconds(whole_group=True) if router else None
    row = run_closed_loop(endpoints, send, concurrency, total, args.warmup, fresh=args.fresh_connections)
    row["target"] = name
    if cpu0 is not None:
        row["router_cpu_s_per_1000"] = (router.cpu_seconds(whole_group=True) - cpu0) / row["requests"] * 1000
    return row


def median_row(rounds: list[dict]) -> dict:
    """One row from repeated rounds: the median of each number, its min-max spread beside it."""
    row = dict(rounds[0])
    for key in ("req_per_s", "p50_ms", "p99_ms", "mean_ms", "router_cpu_s_per_1000"):
        values = sorted(r[key] for r in rounds if key in r)
        if values:
            row[key] = float(np.median(values))
            row[key + "_spread"] = [values[0], values[-1]]
    row["requests"] = sum(r["requests"] for r in rounds)
    row["failures"] = sum(r["failures"] for r in rounds)
    row["rounds"] = len(rounds)
    return row


def measure(cluster: Cluster, prefill: Proc, decode: Proc, args, total: int, label: str) -> list[dict]:
    """Every target at every concurrency, ``--rounds`` times interleaved (the machine's noise then
    hits all targets alike), medians with their spread."""
    routers: dict[str, Proc | None] = {"direct": None}
    for name in args.targets:
        if name == "pdserve":
            routers[name] = cluster.pdserve_router(f"{label}-pdserve-router", [prefill], [decode],
                                                   args=["--policy", "round_robin", *shlex.split(args.pdserve_args)])
        elif name == "pdserve-2p":
            routers[name] = cluster.pdserve_router(f"{label}-pdserve-2p-router", [prefill], [decode],
                                                   args=["--policy", "round_robin", "--router-processes", "2",
                                                         *shlex.split(args.pdserve_args)])
        elif name == "sglang":
            routers[name] = cluster.sglang_router(f"{label}-sglang-router", [prefill], [decode],
                                                  args=["--policy", "round_robin"])
    try:
        for router in routers.values():
            if router is not None:
                cluster.wait_serving(router, timeout=90.0)
        samples: dict[tuple[str, int], list[dict]] = {}
        other_mode: dict[str, list[float]] = {}
        flipped = argparse.Namespace(**{**vars(args), "fresh_connections": not args.fresh_connections})
        for _ in range(args.rounds):
            for name in args.targets:
                for c in args.concurrency:
                    samples.setdefault((name, c), []).append(
                        one_row(name, prefill, decode, routers[name], args, c, total))
                # one client on the other connection mode: a kept-alive stall shows as a ratio >> 1
                other_mode.setdefault(name, []).append(
                    one_row(name, prefill, decode, routers[name], flipped, 1, max(10, total // 10))["p50_ms"])
    finally:
        cluster.stop(*[r for r in routers.values() if r is not None])
    rows = []
    for (name, c), rounds in samples.items():
        row = median_row(rounds)
        row["upstreams"] = label
        if c == 1:
            row["other_connection_mode_p50_ms"] = float(np.median(other_mode[name]))
            kept, new = ((row["p50_ms"], row["other_connection_mode_p50_ms"]) if not args.fresh_connections
                         else (row["other_connection_mode_p50_ms"], row["p50_ms"]))
            row["keepalive_over_fresh_p50"] = kept / new
        rows.append(row)
        cpu = row.get("router_cpu_s_per_1000")
        spread = row["req_per_s_spread"]
        print(f"[{label}] {name:8s} c={c:<3d} {row['req_per_s']:8.1f} req/s ({spread[0]:.0f}-{spread[1]:.0f})  "
              f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  failures {row['failures']}"
              + (f"  router CPU {cpu * 1000:.0f} ms per 1000 req" if cpu is not None else "")
              + (f"  kept-alive/fresh p50 {row['keepalive_over_fresh_p50']:.2f}" if c == 1 else ""), flush=True)
    # ratios against direct at the same concurrency
    direct = {r["concurrency"]: r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = direct.get(r["concurrency"])
        if d is not None and r["target"] != "direct":
            r["added_p50_ms"] = r["p50_ms"] - d["p50_ms"]
            r["added_p99_ms"] = r["p99_ms"] - d["p99_ms"]
            r["req_per_s_vs_direct"] = r["req_per_s"] / d["req_per_s"]
    by = {(r["target"], r["concurrency"]): r for r in rows}
    for c, name in ((c, name) for name in ("pdserve", "pdserve-2p") for c in args.concurrency):
        p, s = by.get((name, c)), by.get(("sglang", c))
        if p and s:
            p["req_per_s_vs_sglang"] = p["req_per_s"] / s["req_per_s"]
            p["p50_vs_sglang"] = p["p50_ms"] / s["p50_ms"]
            p["cpu_vs_sglang"] = p["router_cpu_s_per_1000"] / max(1e-9, s["router_cpu_s_per_1000"])
            if "added_p50_ms" in p and "added_p50_ms" in s:
                p["added_p50_minus_sglang_ms"] = p["added_p50_ms"] - s["added_p50_ms"]
            print(f"[{label}] c={c}: {name}/sglang req/s {p['req_per_s_vs_sglang']:.2f}, p50 latency "
                  f"{p['p50_vs_sglang']:.2f}, router CPU per request {p['cpu_vs_sglang']:.2f}; added p50 over "
                  f"direct: {name} {p.get('added_p50_ms', 0):.2f} ms, sglang {s.get('added_p50_ms', 0):.2f} ms",
                  flush=True)
    return rows


def offline_engine(args: argparse.Namespace):
    """A 1-token ``generate`` of the offline engine in this process (1 torch thread, the servers'
    model): the step's own cost, without HTTP, ZMQ or a second process."""
    import torch

    from pdserve import Engine

    torch.set_num_threads(1)
    engine = Engine(model_path=args.model_path) if args.model_path else Engine()
    params = dict(BODY["sampling_params"], max_new_tokens=args.max_new_tokens)

    def timed(n: int) -> dict:
        for _ in range(args.warmup):
            engine.generate(input_ids=BODY["input_ids"], sampling_params=params)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            engine.generate(input_ids=BODY["input_ids"], sampling_params=params)
            times.append(time.perf_counter() - start)
        times.sort()
        return {"concurrency": 1, "requests": n, "failures": 0, "req_per_s": n / sum(times),
                "p50_ms": times[n // 2] * 1000, "p99_ms": times[min(n - 1, int(n * 0.99))] * 1000,
                "mean_ms": sum(times) / n * 1000, "keep_alive": True}

    return timed


def measure_front(cluster: Cluster, prefill: Proc, decode: Proc, mixed: Proc, args: argparse.Namespace,
                  baseline: tuple[Proc, Proc] | None = None) -> list[dict]:
    """One client, 1-token ``/generate``: a mixed server kept-alive vs fresh, and streamed TTFT of
    P/D (direct: decode's stream, prefill's half alongside) vs mixed, ``--rounds`` times
    interleaved, medians; with ``baseline`` (a P/D pair from another tree), its P/D TTFT too."""
    n = args.front_requests
    ttfts: dict[str, list[float]] = {"mixed TTFT": [], "P/D direct TTFT": []}
    extra_ways = {}
    if baseline is not None:
        ttfts["P/D direct TTFT (baseline tree)"] = []
        extra_ways["P/D direct TTFT (baseline tree)"] = (
            direct_pd_sender(Endpoint(baseline[0].url), Endpoint(baseline[1].url), baseline[0].bootstrap_port,
                             "/generate", body(args), ttfts["P/D direct TTFT (baseline tree)"]), False)
    ways = {
        "mixed kept-alive": (router_sender(Endpoint(mixed.url), "/generate", body(args)), False),
        "mixed fresh": (router_sender(Endpoint(mixed.url), "/generate", body(args)), True),
        "mixed TTFT": (ttft_sender(Endpoint(mixed.url), "/generate", body(args), ttfts["mixed TTFT"]), False),
        "P/D direct TTFT": (direct_pd_sender(Endpoint(prefill.url), Endpoint(decode.url), prefill.bootstrap_port,
                                             "/generate", body(args), ttfts["P/D direct TTFT"]), False),
        **extra_ways,
    }
    samples: dict[str, list[dict]] = {name: [] for name in ways}
    engine = offline_engine(args)
    samples["engine (offline, in-process)"] = []
    for _ in range(args.rounds):
        samples["engine (offline, in-process)"].append(engine(n))
        for name, ((endpoints, send), fresh) in ways.items():
            kept = len(ttfts.get(name, []))
            row = run_closed_loop(endpoints, send, 1, n, args.warmup, fresh=fresh)
            if name in ttfts:  # the timed requests' TTFT, not the warm-up's
                timed = sorted(ttfts[name][kept + args.warmup:])
                row["ttft_p50_ms"] = timed[len(timed) // 2] * 1000
            samples[name].append(row)
    rows = []
    for name in samples:
        row = {**median_row(samples[name]), "target": name, "upstreams": "front"}
        if name in ttfts:
            values = sorted(r["ttft_p50_ms"] for r in samples[name])
            row["ttft_p50_ms"], row["ttft_p50_ms_spread"] = float(np.median(values)), [values[0], values[-1]]
        rows.append(row)
    by_name = {r["target"]: r for r in rows}
    kept, new, mixed_ttft, pd_ttft, offline = (by_name[name] for name in (
        "mixed kept-alive", "mixed fresh", "mixed TTFT", "P/D direct TTFT", "engine (offline, in-process)"))
    if baseline is not None:
        base = by_name["P/D direct TTFT (baseline tree)"]
        base["pd_over_mixed_ttft_p50"] = base["ttft_p50_ms"] / mixed_ttft["ttft_p50_ms"]
        pd_ttft["over_baseline_tree_ttft_p50"] = pd_ttft["ttft_p50_ms"] / base["ttft_p50_ms"]
    kept["keepalive_over_fresh_p50"] = kept["p50_ms"] / new["p50_ms"]
    kept["minus_offline_engine_p50_ms"] = kept["p50_ms"] - offline["p50_ms"]
    kept["keepalive_minus_fresh_p50_ms"] = kept["p50_ms"] - new["p50_ms"]
    pd_ttft["pd_over_mixed_ttft_p50"] = pd_ttft["ttft_p50_ms"] / mixed_ttft["ttft_p50_ms"]
    for r in rows:
        extra = f"  TTFT p50 {r['ttft_p50_ms']:6.2f} ms" if "ttft_p50_ms" in r else ""
        print(f"[front] {r['target']:18s} p50 {r['p50_ms']:6.2f} ms ({r['p50_ms_spread'][0]:.2f}-"
              f"{r['p50_ms_spread'][1]:.2f})  p99 {r['p99_ms']:6.2f} ms{extra}  failures {r['failures']}", flush=True)
    print(f"[front] kept-alive / fresh p50 {kept['keepalive_over_fresh_p50']:.2f} "
          f"({kept['keepalive_minus_fresh_p50_ms']:+.2f} ms), kept-alive over the offline engine "
          f"{kept['minus_offline_engine_p50_ms']:+.2f} ms; P/D / mixed TTFT p50 "
          f"{pd_ttft['pd_over_mixed_ttft_p50']:.2f}", flush=True)
    if baseline is not None:
        print(f"[front] P/D TTFT p50 this tree / baseline tree {pd_ttft['over_baseline_tree_ttft_p50']:.2f}; "
              f"baseline P/D / mixed {by_name['P/D direct TTFT (baseline tree)']['pd_over_mixed_ttft_p50']:.2f}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-bench-router-"))
    out: dict = {"benchmark": "router_overhead", "machine": machine_info(), "argv": sys.argv[1:],
                 "args": vars(args), "rows": []}
    t0 = time.monotonic()
    if not args.no_real:
        with Cluster(log_dir / "real", model_path=args.model_path, torch_threads=torch_threads_per_worker(3)) as cluster:
            prefill = cluster.server("prefill", "prefill", 1, 8192)
            decode = cluster.server("decode", "decode", 1, 8192)
            mixed = cluster.server("mixed", None, 1, 8192)
            baseline = None
            if args.baseline_tree:
                env = {"PYTHONPATH": str(Path(args.baseline_tree).resolve())}
                baseline = (cluster.server("base-prefill", "prefill", 1, 8192, env=env),
                            cluster.server("base-decode", "decode", 1, 8192, env=env))
            cluster.wait_healthy()
            cluster.warm_up(mixed, 1, (4, 64))
            for pair in ((prefill, decode), *((baseline,) if baseline else ())):
                cluster.warm_up_pd(*pair, 1, 1, (4, 64))
            out["rows"] += measure_front(cluster, prefill, decode, mixed, args, baseline)
            cluster.stop(mixed, *(baseline or ()))
            if not args.front_only:
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
