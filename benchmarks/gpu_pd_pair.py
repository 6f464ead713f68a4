#!/usr/bin/env python
"""GPU check 3: one prefill and one decode server on one GPU with the tcp transfer backend, behind
``pdserve router``; their greedy outputs must equal one colocated server's on the same prompts.

On CUDA both pools stay on the GPU and the tcp backend stages their pages through pinned host
buffers (``pdserve/disagg/transfer/staging.py``). ``--device cpu`` runs the same pair on CPU pools
(unstaged, or staged with ``PDSERVE_TEST_KV_STAGING=1`` in the environment). Exits non-zero when a
server fails to start or any output differs."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

from pdserve.bench.cluster import Cluster, post_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="device of all three servers (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=16, help="greedy prompts compared (default: %(default)s)")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 2000) for _ in range(rng.randint(16, 600))] for _ in range(args.num_prompts)]
    extra = ["--device", args.device]
    with tempfile.TemporaryDirectory() as logs, Cluster(logs) as cluster:
        prefill = cluster.server("prefill", mode="prefill", transfer_backend="tcp", extra=extra)
        decode = cluster.server("decode", mode="decode", transfer_backend="tcp", extra=extra)
        mixed = cluster.server("mixed", extra=extra)
        try:
            cluster.wait_healthy([prefill, decode, mixed])
            router = cluster.pdserve_router("router", prefill=[prefill], decode=[decode])
            cluster.wait_healthy([router])
        except Exception as exc:
            for proc in cluster.procs:
                print(f"--- {proc.name}\n{proc.log_tail()}")
            print(f"FAILED to start: {exc}")
            return 1
        mismatches = 0
        for ids in prompts:
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}}
            s1, pd = post_json(f"{router.url}/generate", body, timeout=120)
            s2, co = post_json(f"{mixed.url}/generate", body, timeout=120)
            if s1 != 200 or s2 != 200 or pd["output_ids"] != co["output_ids"]:
                mismatches += 1
                print(f"prompt of {len(ids)} tokens: P/D {s1} vs colocated {s2}: {str(pd)[:200]} / {str(co)[:200]}")
        print(f"P/D pair on {args.device} (tcp): {len(prompts) - mismatches}/{len(prompts)} outputs equal colocated")
        return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
