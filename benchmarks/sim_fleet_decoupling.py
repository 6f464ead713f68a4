#!/usr/bin/env python
"""Decoupled vs coupled DP dispatch on a simulated GPU fleet (``pdserve serve --simulate``).

A fleet of sim servers at H100 (or H200) timing — e.g. prefill 2 servers x DP 4 and decode
2 servers x DP 8 of Llama-3.1-8B, and the reverse — runs the real front, scheduler, KV
accounting, P/D protocol and router; only the forward pass is a roofline clock, slowed by
``--time-scale`` so that 2 CPU cores keep up (all times below are reported back at GPU timing,
i.e. divided by the scale). Workload: skewed prompt lengths (a share of long prompts) with
Poisson arrivals, plus a burst (all requests at once). For each request rate, ``pdserve router``
decoupled and ``--dp-coupled`` (each policy given) and sglang-router 0.3.2 serve the same seeded
requests; reported: goodput under TTFT/TPOT SLOs, attainment, p50/p99 TTFT and TPOT; repeats
interleaved. Writes JSON and PNGs of goodput vs rate: all modes per topology (``--plot``), and
one per dispatch mode (``--plot`` with ``_decoupled``/``_coupled`` before the suffix: every policy,
sglang-router in both).

Drift: every sim server writes a ``--step-trace``; afterwards each busy step's real duration
(previous forward's end to its own) is compared with what the cost model asked for (times the
time scale): ``drift = sum(real) / sum(modelled) - 1``, reported per topology (``drift``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdserve.bench.cluster import Cluster, machine_info, write_result
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.profile import continues
from pdserve.bench.serving import ServingConfig, benchmark
from pdserve.engine.step_trace import read_trace
from pdserve.sim.cost_model import StepShape, make_cost_model
from pdserve.sim.model_shape import ModelShape

MODELS = Path(__file__).resolve().parent / "sim_models"
KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "request_throughput")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="folder under benchmarks/sim_models (default: llama-3.1-8b)")
    p.add_argument("--hardware", default="H100-SXM", help="--simulate value of every server (default: H100-SXM)")
    p.add_argument("--tp-size", type=int, default=1, help="simulated tensor parallelism per rank (default: 1)")
    p.add_argument("--topologies", nargs="+", default=["2x4:2x8", "2x8:2x4"],
                   help="PREFILL_SERVERSxDP:DECODE_SERVERSxDP (default: 2x4:2x8 2x8:2x4)")
    p.add_argument("--time-scale", type=float, default=20.0, help="slow the simulated clock this much (default: 20)")
    p.add_argument("--rates", type=float, nargs="+", default=[40, 80, 120], help="requests/s at GPU timing (default: 40 80 120)")
    p.add_argument("--num-prompts", type=int, default=80, help="requests per run (default: 80)")
    p.add_argument("--long-share", type=float, default=0.2, help="share of long prompts (default: 0.2)")
    p.add_argument("--long-input", type=int, nargs=2, default=(3000, 6000), help="long prompt tokens, min max (default: 3000 6000)")
    p.add_argument("--short-input", type=int, nargs=2, default=(100, 600), help="short prompt tokens, min max (default: 100 600)")
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 128), help="output tokens, min max (default: 32 128)")
    p.add_argument("--slo-ttft-ms", type=float, default=400.0, help="TTFT SLO in ms at GPU timing (default: 400)")
    p.add_argument("--slo-tpot-ms", type=float, default=40.0, help="TPOT SLO in ms at GPU timing (default: 40)")
    p.add_argument("--policies", nargs="+", default=["least_load"], help="router policies, each decoupled and coupled (default: least_load)")
    p.add_argument("--sglang", action="store_true", help="also run sglang-router 0.3.2 (its default policy; default: off)")
    p.add_argument("--burst", action="store_true", help="also one burst (all requests at once) per mode (default: off)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="keep the servers' prefix cache (default: off, --disable-radix-cache: every mode and repeat "
                        "serves the same prompts, so a cache would turn later runs into cache hits)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode and rate, interleaved (default: 2)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only draw --plot from a result file of an earlier run (default: run the benchmark)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--log-dir", default=None, help="server and router logs (default: a new temporary folder)")
    p.add_argument("--output-file", default="benchmarks/results/sim_fleet_decoupling.json", help="JSON result (default: %(default)s)")
    p.add_argument("--plot", default="benchmarks/results/sim_fleet_decoupling.png", help="PNG plot (default: %(default)s)")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_prompts):
        lo, hi = args.long_input if rng.random() < args.long_share else args.short_input
        n = rng.randint(lo, hi)
        out.append(BenchRequest("", [rng.randrange(1000, 120000) for _ in range(n)], rng.randint(*args.output_len)))
    return out


def run_once(cluster: Cluster, router, requests, rate_real: float, args) -> dict:
    scale = args.time_scale
    slo = {"ttft": args.slo_ttft_ms * scale, "tpot": args.slo_tpot_ms * scale}
    config = ServingConfig(base_url=router.url, backend="pdserve", num_prompts=len(requests), request_rate=rate_real,
                           goodput=slo, seed=args.seed, warmup_requests=0, disable_tqdm=True,
                           request_timeout_s=600.0)
    m = benchmark(config, requests).metrics
    row = {k: (m[k] / scale if k.endswith("_ms") and m[k] is not None else m[k]) for k in KEYS}
    row["request_throughput"] = m["request_throughput"] * scale
    row["goodput"] = m["request_goodput"] * scale if m["request_goodput"] is not None else None
    row.update(slo_attainment=m["slo_attainment"], completed=m["completed"], failed=m["failed"])
    return row


def modes(args) -> list[tuple[str, str, list[str]]]:
    out = []
    for policy in args.policies:
        base = ["--policy", policy, "--load-poll-interval-secs", "0.5"]
        out.append((f"decoupled/{policy}", "pdserve", base))
        out.append((f"coupled/{policy}", "pdserve", [*base, "--dp-coupled"]))
    if args.sglang:
        out.append(("sglang-router", "sglang", []))
    return out


def drift(traces: list[Path], args: argparse.Namespace) -> dict:
    """How much longer the sim's busy steps took than the cost model asked (see the docstring)."""
    cost = make_cost_model(args.hardware, ModelShape.from_folder(MODELS / args.model), args.tp_size)
    real = modelled = 0.0
    steps = late = 0
    for path in traces:
        _, lines = read_trace(str(path))
        for previous, step in zip(lines, lines[1:]):
            if not continues(step, previous):
                continue
            want = cost.step_seconds(StepShape(step["decodes"], [tuple(e) for e in step["extends"]])) * args.time_scale
            took = step["end"] - previous["end"]
            real += took
            modelled += want
            steps += 1
            late += took > want * 1.1
    return {"steps": steps, "drift": real / modelled - 1 if modelled else None,
            "steps_over_10pct_late": late / steps if steps else None}


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args)
        print(f"wrote {args.plot}")
        return 0
    requests = workload(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-sim-bench-"))
    model = str(MODELS / args.model)
    out: dict = {"benchmark": "sim_fleet_decoupling", "machine": machine_info(), "argv": sys.argv[1:],
                 "args": vars(args), "topologies": []}
    sim = ["--simulate", args.hardware, "--tp-size", str(args.tp_size), "--time-scale", str(args.time_scale),
           "--model-path", model, *([] if args.prefix_cache else ["--disable-radix-cache"])]
    print(f"{args.model} on {args.hardware} TP{args.tp_size}, time scale {args.time_scale:g}; {len(requests)} requests, "
          f"{args.long_share:.0%} prompts {args.long_input}, rest {args.short_input}, outputs {args.output_len}; "
          f"SLO TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms (GPU timing); logs {log_dir}",
          flush=True)
    t0 = time.monotonic()
    for topo in args.topologies:
        (pn, pdp), (dn, ddp) = (tuple(int(x) for x in side.split("x")) for side in topo.split(":"))
        with Cluster(log_dir / topo.replace(":", "-")) as cluster:
            start = time.monotonic()
            trace_dir = log_dir / topo.replace(":", "-")
            prefills = [cluster.server(f"p{i}", "prefill", pdp, transfer_backend="sim",
                                       extra=[*sim, "--step-trace", str(trace_dir / f"trace-p{i}")]) for i in range(pn)]
            decodes = [cluster.server(f"d{i}", "decode", ddp, transfer_backend="sim",
                                      extra=[*sim, "--step-trace", str(trace_dir / f"trace-d{i}")]) for i in range(dn)]
            cluster.wait_healthy(timeout=300)
            startup_s = time.monotonic() - start
            print(f"[{topo}] {pn * pdp + dn * ddp} sim ranks healthy in {startup_s:.1f} s", flush=True)
            runs: dict[str, dict[str, list[dict]]] = {}
            rates = [*args.rates, *(["burst"] if args.burst else [])]
            for rep in range(args.repeats):
                for name, kind, router_args in modes(args):
                    if kind == "sglang":
                        router = cluster.sglang_router(f"r-{name}-{rep}", prefills, decodes)
                    else:
                        router = cluster.pdserve_router(f"r-{name.replace('/', '-')}-{rep}", prefills, decodes,
                                                        args=router_args)
                    try:
                        cluster.wait_healthy([router], timeout=60)
                        time.sleep(3)  # the router admits its workers on its first health round
                        for rate in rates:
                            real = float("inf") if rate == "burst" else rate / args.time_scale
                            row = run_once(cluster, router, requests, real, args)
                            runs.setdefault(name, {}).setdefault(str(rate), []).append(row)
                            print(f"[{topo}] {name:22s} rate {rate!s:>5} run {rep + 1}: goodput {fmt(row['goodput'])} "
                                  f"req/s ({row['slo_attainment']:.0%}), TTFT p50/p99 {fmt(row['median_ttft_ms'])}/"
                                  f"{fmt(row['p99_ttft_ms'])} ms, TPOT p50/p99 {fmt(row['median_tpot_ms'])}/"
                                  f"{fmt(row['p99_tpot_ms'])} ms, {row['completed']} ok/{row['failed']} failed",
                                  flush=True)
                    finally:
                        cluster.stop(router)
        summary = {name: {rate: {"goodput_mean": statistics.mean(r["goodput"] or 0 for r in rows),
                                 "goodput_spread": [min(r["goodput"] or 0 for r in rows),
                                                    max(r["goodput"] or 0 for r in rows)],
                                 "p99_ttft_ms_mean": statistics.mean(r["p99_ttft_ms"] or 0 for r in rows)}
                          for rate, rows in by_rate.items()} for name, by_rate in runs.items()}
        drifted = drift(sorted(trace_dir.glob("trace-*.jsonl")), args)
        if drifted["steps"]:
            print(f"[{topo}] drift of busy sim steps: {drifted['drift']:+.2%} over {drifted['steps']} steps "
                  f"({drifted['steps_over_10pct_late']:.1%} of them > 10 % late)", flush=True)
        out["topologies"].append({"topology": topo, "ranks": pn * pdp + dn * ddp, "startup_s": startup_s,
                                  "runs": runs, "summary": summary, "drift": drifted})
        for policy in args.policies:
            d, c = summary.get(f"decoupled/{policy}", {}), summary.get(f"coupled/{policy}", {})
            ratios = {rate: d[rate]["goodput_mean"] / c[rate]["goodput_mean"] if c[rate]["goodput_mean"] else None
                      for rate in d if rate in c}
            print(f"[{topo}] {policy}: decoupled / coupled goodput: "
                  + ", ".join(f"{rate}: {fmt(v)}" for rate, v in ratios.items()), flush=True)
    out["wall_s"] = time.monotonic() - t0
    write_result(args.output_file, out)
    plot(out, args)
    print(f"wrote {args.output_file} and {args.plot} ({out['wall_s']:.0f} s)")
    return 0


def plot(out: dict, args: argparse.Namespace) -> None:
    """Per topology: goodput (top) and median TTFT (bottom) per mode at each rate (the burst last);
    bars span the runs' min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topos = out["topologies"]
    fig, axes = plt.subplots(2, len(topos), figsize=(7 * len(topos), 8), squeeze=False)
    for col, topo in enumerate(topos):
        rates = sorted({r for by_rate in topo["runs"].values() for r in by_rate},
                       key=lambda r: (r == "burst", float(r) if r != "burst" else 0.0))
        policies = sorted({name.split("/")[-1] for name in topo["runs"]})
        for name, by_rate in topo["runs"].items():
            style = {"linestyle": "--" if name.startswith("coupled") else "-", "marker": "o", "capsize": 3,
                     "color": f"C{policies.index(name.split('/')[-1])}"}  # a policy's two modes share a colour
            for row, key in ((0, "goodput"), (1, "median_ttft_ms")):
                xs, ys, lo, hi = _series(by_rate, rates, key)
                axes[row][col].errorbar(xs, ys, yerr=[lo, hi], label=name, **style)
        a = out["args"]
        title = f"{a['model']} {a['hardware']} TP{a['tp_size']}, P:D = {topo['topology']}"
        for row, label in ((0, f"goodput (req/s, TTFT<={a['slo_ttft_ms']:g} ms, TPOT<={a['slo_tpot_ms']:g} ms)"),
                           (1, "TTFT p50 (ms)")):
            ax = axes[row][col]
            ax.set_xticks(range(len(rates)), [r if r == "burst" else f"{float(r):g}" for r in rates])
            ax.set_xlabel("request rate (req/s, GPU timing)")
            ax.set_ylabel(label)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)
    for mode in ("decoupled", "coupled"):
        plot_mode(out, args, mode, plt)


def _series(by_rate: dict, rates: list, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """One curve's points: x index of each rate that has runs, the mean of ``key`` over its runs, and
    the distances down to the min and up to the max (error bars)."""
    xs, ys, lo, hi = [], [], [], []
    for i, rate in enumerate(rates):
        vals = [r[key] or 0.0 for r in by_rate.get(rate, [])]
        if vals:
            mean = statistics.mean(vals)
            xs.append(i)
            ys.append(mean)
            lo.append(mean - min(vals))
            hi.append(max(vals) - mean)
    return xs, ys, lo, hi


def plot_mode(out: dict, args: argparse.Namespace, mode: str, plt) -> None:
    """Goodput vs rate of every policy in one dispatch mode (sglang-router drawn in both), one
    panel per topology, to ``--plot`` with ``_<mode>`` before the suffix."""
    topos = out["topologies"]
    fig, axes = plt.subplots(1, len(topos), figsize=(7 * len(topos), 4.5), squeeze=False)
    a = out["args"]
    for col, topo in enumerate(topos):
        ax = axes[0][col]
        rates = sorted({r for by_rate in topo["runs"].values() for r in by_rate},
                       key=lambda r: (r == "burst", float(r) if r != "burst" else 0.0))
        policies = sorted({name.split("/")[-1] for name in topo["runs"]})
        for name, by_rate in topo["runs"].items():
            if not (name.startswith(f"{mode}/") or name == "sglang-router"):
                continue
            xs, ys, lo, hi = _series(by_rate, rates, "goodput")
            ax.errorbar(xs, ys, yerr=[lo, hi], label=name, marker="o", capsize=3,
                        color=f"C{policies.index(name.split('/')[-1])}", linestyle=":" if "sglang" in name else "-")
        ax.set_xticks(range(len(rates)), [r if r == "burst" else f"{float(r):g}" for r in rates])
        ax.set_xlabel("request rate (req/s, GPU timing)")
        ax.set_ylabel(f"goodput (req/s, TTFT<={a['slo_ttft_ms']:g} ms, TPOT<={a['slo_tpot_ms']:g} ms)")
        ax.set_title(f"{mode}: {a['model']} {a['hardware']} TP{a['tp_size']}, P:D = {topo['topology']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(args.plot)
    fig.savefig(path.with_name(f"{path.stem}_{mode}{path.suffix}"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
