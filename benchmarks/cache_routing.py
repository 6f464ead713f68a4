#!/usr/bin/env python
"""Cache-based routing with real servers and the real ``pdserve router`` (tiny model, CPU).

``--part multi-turn``: one prefill server (DP 1) and two decode servers (DP 2; the second with
``--disable-radix-cache``); the same seeded ``multi-turn`` workload (text prompts,
``openai-completions``) through routers whose decode policy is ``prefix``, ``round_robin`` (both on
the caching decode server) and ``round_robin`` on the cache-less decode server (nothing reused: every prompt's KV sent whole); prefill: ``least_load``.
Printed per setup: KV bytes the decode server received (``pdserve:kv_transfer_bytes`` on its
``/metrics``, difference over the run), prompt tokens sent, TTFT p50.

``--part routing``: two prefill servers (DP 2 each) and one decode server (DP 1); the same seeded
``generated-shared-prefix`` workload (text prompts) through routers whose prefill policy is
``cache_aware``, ``least_load`` and ``round_robin``. Printed per setup: goodput (requests/s meeting
the TTFT SLO), TTFT p50/p99 and the prefill servers' cache hit rate over the run (1 - prefill
tokens computed / prompt tokens, from their ``/get_load``).

Every cache is flushed before each setup, whose order rotates over ``--repeats`` runs. Numbers, not
pass/fail.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.cluster import Cluster, Proc, machine_info, write_result
from pdserve.bench.serving import ServingConfig, benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("multi-turn", "routing", "both"), default="both",
                   help="which comparison to run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each comparison (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=1, help="per server (default: %(default)s)")
    p.add_argument("--conversations", type=int, default=8, help="multi-turn conversations (default: %(default)s)")
    p.add_argument("--conversation-rate", type=float, default=4.0,
                   help="multi-turn conversation starts per second (default: %(default)s)")
    p.add_argument("--guard-abs", type=int, default=None,
                   help="--balance-abs-threshold of every router (default: the router's)")
    p.add_argument("--groups", type=int, default=8, help="routing: system prompts (default: %(default)s)")
    p.add_argument("--per-group", type=int, default=8, help="routing: questions per system prompt (default: %(default)s)")
    p.add_argument("--system-len", type=int, default=512, help="routing: system prompt tokens (default: %(default)s)")
    p.add_argument("--request-rate", type=float, default=4.0, help="routing: requests/s (default: %(default)s)")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="routing: goodput SLO (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.add_argument("--output", default=None, help="write the result as JSON here (default: none)")
    return p.parse_args(argv)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def flush(*procs: Proc) -> None:
    for proc in procs:
        for _ in range(50):
            try:
                with urllib.request.urlopen(urllib.request.Request(proc.url + "/flush_cache", method="POST"),
                                            timeout=30):
                    break
            except urllib.error.HTTPError:  # a request still finishing: try again shortly
                time.sleep(0.2)


def transfer_bytes(proc: Proc) -> float:
    text = get(proc.url + "/metrics").decode()
    return sum(s.value for family in text_string_to_metric_families(text) if family.name == "pdserve:kv_transfer_bytes"
               for s in family.samples if s.name.endswith("_total"))


def prefill_counters(procs: list[Proc]) -> tuple[int, int]:
    computed = prompt = 0
    for proc in procs:
        for rank in json.loads(get(proc.url + "/get_load")):
            computed += rank["prefill_tokens_computed"]
            prompt += rank["prompt_tokens_total"]
    return computed, prompt


def guard(args: argparse.Namespace) -> list[str]:
    return [] if args.guard_abs is None else ["--balance-abs-threshold", str(args.guard_abs)]


def serve_config(router: Proc, args: argparse.Namespace, **fields) -> ServingConfig:
    return ServingConfig(base_url=router.url, backend="openai-completions", seed=args.seed, disable_tqdm=True,
                         warmup_requests=0, **fields)


def multi_turn(c: Cluster, args: argparse.Namespace) -> list[dict]:
    prefill = c.server("mt-prefill", mode="prefill", dp_size=1, max_total_tokens=32768)
    decode = c.server("mt-decode", mode="decode", dp_size=2, max_total_tokens=32768)
    uncached = c.server("mt-decode-nocache", mode="decode", dp_size=2, max_total_tokens=32768,
                        extra=["--disable-radix-cache"])
    c.wait_healthy([prefill, decode, uncached])
    routers = {
        "prefix": c.pdserve_router("mt-router-prefix", [prefill], [decode],
                                   args=["--prefill-policy", "least_load", "--decode-policy", "prefix",
                                         *guard(args)]),
        "round_robin": c.pdserve_router("mt-router-rr", [prefill], [decode],
                                        args=["--prefill-policy", "least_load", "--decode-policy", "round_robin"]),
        "no_decode_cache": c.pdserve_router("mt-router-nocache", [prefill], [uncached],
                                            args=["--prefill-policy", "least_load", "--decode-policy",
                                                  "round_robin"]),
    }
    decode_of = {"prefix": decode, "round_robin": decode, "no_decode_cache": uncached}
    for r in routers.values():
        c.wait_serving(r)
    runs = []
    for run in range(args.repeats):
        names = list(routers)
        order = names[run % 3:] + names[:run % 3]
        setups = {}
        for policy in order:
            flush(prefill, decode, uncached)
            before = transfer_bytes(decode_of[policy])
            config = serve_config(routers[policy], args, dataset="multi-turn", request_rate=args.conversation_rate,
                                  mt_num_conversations=args.conversations, mt_turns_min=4, mt_turns_max=8,
                                  mt_system_prompt_len=256, mt_question_len=32, mt_output_len=16)
            result = benchmark(config)
            setups[policy] = {
                "kv_bytes_received": transfer_bytes(decode_of[policy]) - before,
                "requests": result.metrics["completed"],
                "prompt_tokens": result.metrics["total_input_tokens"],
                "median_ttft_ms": result.metrics["median_ttft_ms"],
                "errors": sorted({r.error for r in result.records if not r.success})[:5],
            }
            print("multi-turn", run, policy, json.dumps(setups[policy]), flush=True)
        for other in ("round_robin", "no_decode_cache"):
            setups[f"bytes_{other}_over_prefix"] = round(
                setups[other]["kv_bytes_received"] / max(1.0, setups["prefix"]["kv_bytes_received"]), 2)
        print("multi-turn", run, "ratios", setups["bytes_round_robin_over_prefix"],
              setups["bytes_no_decode_cache_over_prefix"], flush=True)
        runs.append(setups)
    c.stop(*routers.values(), prefill, decode, uncached)
    return runs


def routing(c: Cluster, args: argparse.Namespace) -> list[dict]:
    prefills = [c.server(f"rt-prefill{i}", mode="prefill", dp_size=2, max_total_tokens=32768) for i in range(2)]
    decode = c.server("rt-decode", mode="decode", dp_size=1, max_total_tokens=65536)
    c.wait_healthy([*prefills, decode])
    policies = ("cache_aware", "least_load", "round_robin")
    routers = {
        policy: c.pdserve_router(f"rt-router-{policy}", prefills, [decode],
                                 args=["--prefill-policy", policy, "--decode-policy", "least_load", *guard(args)])
        for policy in policies
    }
    for r in routers.values():
        c.wait_serving(r)
    runs = []
    for run in range(args.repeats):
        order = policies[run % 3:] + policies[:run % 3]
        setups = {}
        for policy in order:
            flush(*prefills, decode)
            before = prefill_counters(prefills)
            config = serve_config(routers[policy], args, dataset="generated-shared-prefix",
                                  request_rate=args.request_rate, gsp_num_groups=args.groups,
                                  gsp_prompts_per_group=args.per_group, gsp_system_prompt_len=args.system_len,
                                  gsp_question_len=32, gsp_output_len=8, goodput={"ttft": args.ttft_slo_ms})
            result = benchmark(config)
            metrics = result.metrics
            after = prefill_counters(prefills)
            computed, prompt = after[0] - before[0], after[1] - before[1]
            setups[policy] = {
                "goodput_req_s": metrics["request_goodput"],
                "slo_attainment": metrics["slo_attainment"],
                "median_ttft_ms": metrics["median_ttft_ms"],
                "p99_ttft_ms": metrics["p99_ttft_ms"],
                "completed": metrics["completed"],
                "prefill_tokens_computed": computed,
                "cache_hit_rate": round(1 - computed / max(1, prompt), 3),
                "errors": sorted({r.error for r in result.records if not r.success})[:5],
            }
            print("routing", run, policy, json.dumps(setups[policy]), flush=True)
        runs.append(setups)
    c.stop(*routers.values(), *prefills, decode)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict = {"machine": machine_info(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as logs, Cluster(logs, torch_threads=args.torch_threads) as c:
        if args.part in ("multi-turn", "both"):
            result["multi_turn"] = multi_turn(c, args)
        if args.part in ("routing", "both"):
            result["routing"] = routing(c, args)
    if args.output:
        write_result(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
