#!/usr/bin/env python
"""GPU check 1: greedy output of the pdserve engine vs transformers on CUDA, token by token.

Two configs: the embedded tiny model and a random-weight model with SmolLM2-135M's shape, both in
float32 (identity is expected there; bf16 kernels differ between the two, so bf16 reports an
agreement rate). Each engine run is done twice, decoding with CUDA graphs (the default) and without
(``disable_cuda_graph``): both are compared with transformers and with each other, and the engine
times of the two are printed.

On a GPU, float32 GEMMs of different shapes (the engine's flat batch of many requests, transformers'
one request) may reduce in a different order, so a greedy pick can flip where the two best logits
are within rounding of each other. Every float32 divergence is therefore judged by transformers'
own logits at that point (one forward over the prompt and the tokens both agreed on): a *near tie*
(the two tokens' logits within ``--tie-tolerance`` of the largest logit's magnitude) is reported
as such, anything else is a failure. Exits non-zero on a failure in float32, graphs vs transformers
or graphs vs eager.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from pdserve.bench.engine_throughput import (
    MODELS,
    agreement,
    build_model,
    run_hf_static,
    run_pdserve,
    workload,
)


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if n is None and len(ours) != len(theirs):
        return min(len(ours), len(theirs))
    return n


@torch.inference_mode()
def divergence_gaps(hf, prompts, ours, theirs) -> list[float]:
    """For each request whose output differs from the reference: transformers' logit gap between
    the reference's token and ours at the first difference, relative to the largest logit there
    (``inf`` when one output is only longer)."""
    gaps = []
    for prompt, a, b in zip(prompts, ours, theirs):
        n = first_divergence(a, b)
        if n is None:
            continue
        if n >= min(len(a), len(b)):
            gaps.append(float("inf"))
            continue
        logits = hf(torch.tensor([prompt + b[:n]], device=hf.device)).logits[0, -1].float()
        gaps.append(float((logits[b[n]] - logits[a[n]]).abs() / logits.abs().max().clamp_min(1.0)))
    return gaps


def judge(label: str, gaps: list[float], tolerance: float) -> bool:
    """Print the divergences of one comparison; True when one is not a near tie."""
    if not gaps:
        return False
    worst = max(gaps)
    ties = sum(g <= tolerance for g in gaps)
    print(f"  {label}: {len(gaps)} divergent requests, {ties} at near ties (largest relative logit gap "
          f"{worst:.2e}, tolerance {tolerance:.0e})", flush=True)
    return ties < len(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="device of both engines (default: cuda)")
    parser.add_argument("--models", nargs="+", default=["tiny", "135m"], choices=list(MODELS),
                        help="model shapes (random weights; default: tiny 135m)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="dtypes to run; only float32 must be identical (default: float32 bfloat16)")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per model and dtype (default: 16)")
    parser.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"),
                        help="prompt length range (default: 16 256)")
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                        help="output length range (default: 16 64)")
    parser.add_argument("--tie-tolerance", type=float, default=1e-4,
                        help="float32 divergences whose logit gap, relative to the largest logit, is at most "
                             "this count as near ties, not failures (default: 1e-4)")
    args = parser.parse_args()
    import transformers

    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = build_model(name, Path(tmp))
            vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
            prompts, outputs = workload(args.num_prompts, vocab, 1, tuple(args.input_len), tuple(args.output_len))
            for dtype in args.dtypes:
                hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
                hf = hf.to(args.device).eval()
                _, theirs = run_hf_static(hf, prompts, outputs, batch_size=1)  # no padding: exact reference
                runs = {}
                for mode, disable in (("cuda graphs", False), ("eager", True)):
                    secs, ours, _ = run_pdserve(path, prompts, outputs, dtype, args.device, disable_cuda_graph=disable)
                    runs[mode] = (secs, ours)
                    same, tokens = agreement(ours, theirs)
                    print(f"{name} {dtype} on {args.device}, {mode}: {100 * same:.0f} % of requests identical to "
                          f"transformers, {100 * tokens:.1f} % of tokens before the first divergence; engine "
                          f"{secs:.2f} s", flush=True)
                    if dtype == "float32" and judge("vs transformers", divergence_gaps(hf, prompts, ours, theirs),
                                                    args.tie_tolerance):
                        failures.append(f"{name} float32 {mode} vs transformers")
                (graph_s, graph_out), (eager_s, eager_out) = runs["cuda graphs"], runs["eager"]
                same, tokens = agreement(graph_out, eager_out)
                print(f"{name} {dtype}: cuda graphs vs eager: {100 * same:.0f} % of requests identical, "
                      f"{100 * tokens:.1f} % of tokens; eager / graphs time = {eager_s / graph_s:.2f}x", flush=True)
                if dtype == "float32" and judge("graphs vs eager", divergence_gaps(hf, prompts, graph_out, eager_out),
                                                args.tie_tolerance):
                    failures.append(f"{name} float32 cuda graphs vs eager")
                del hf
    print("identity: " + ("FAIL (" + "; ".join(failures) + ")" if failures else "PASS (every float32 divergence "
                                                                                 "is a near tie, or none)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
