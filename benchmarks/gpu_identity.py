#!/usr/bin/env python
"""GPU check 1: greedy output of the pdserve engine vs transformers on CUDA, token by token.

Two configs: the embedded tiny model and a random-weight model with SmolLM2-135M's shape, both in
float32 (identity is expected there; bf16 kernels differ between the two, so bf16 reports an
agreement rate). Each engine run is done twice, decoding with CUDA graphs (the default) and without
(``disable_cuda_graph``): both are compared with transformers and with each other, and the engine
times of the two are printed. Exits non-zero when a float32 output differs from transformers or a
graph run's float32 output differs from the eager run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from pdserve.bench.engine_throughput import agreement, build_model, run_hf_static, run_pdserve, workload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-prompts", type=int, default=16)
    args = parser.parse_args()
    import transformers

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny", "135m"):
            path = build_model(name, Path(tmp))
            vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
            prompts, outputs = workload(args.num_prompts, vocab, 1, (16, 256), (16, 64))
            for dtype in ("float32", "bfloat16"):
                hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
                hf = hf.to(args.device).eval()
                _, theirs = run_hf_static(hf, prompts, outputs, batch_size=1)  # no padding: exact reference
                runs = {}
                for mode, disable in (("cuda graphs", False), ("eager", True)):
                    secs, ours = run_pdserve(path, prompts, outputs, dtype, args.device, disable_cuda_graph=disable)
                    runs[mode] = (secs, ours)
                    same, tokens = agreement(ours, theirs)
                    print(f"{name} {dtype} on {args.device}, {mode}: {100 * same:.0f} % of requests identical to "
                          f"transformers, {100 * tokens:.1f} % of tokens before the first divergence; engine "
                          f"{secs:.2f} s", flush=True)
                    if dtype == "float32" and same < 1:
                        failed = True
                (graph_s, graph_out), (eager_s, eager_out) = runs["cuda graphs"], runs["eager"]
                same, tokens = agreement(graph_out, eager_out)
                print(f"{name} {dtype}: cuda graphs vs eager: {100 * same:.0f} % of requests identical, "
                      f"{100 * tokens:.1f} % of tokens; eager / graphs time = {eager_s / graph_s:.2f}x", flush=True)
                if dtype == "float32" and same < 1:
                    failed = True
                del hf
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
