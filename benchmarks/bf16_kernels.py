"""Each native bf16 kernel against torch's own bf16 op, in one run, at the 135M layer shape (SmolLM2-135M:
hidden 576, 9 query / 3 KV heads of 64): decode attention over 32 rows x 384 and x 1024 tokens
of scattered pages (and at 384 over 30 layers' pages in turn, per 30 layers: the engine's case, KV read from
DRAM, where one layer's 9.4 MB would stay in L3 call after call) (the blocked AVX512-BF16 kernel, the generic C), causal prefill
attention of a 512-token chunk, RMSNorm (with the residual add) and RoPE at 32 and 512 rows, and each linear
of a layer plus the LM head at 1, 32 and 512 rows as ``F.linear`` vs oneDNN-packed (``pdserve.models.packed_linear``,
bf16 and fp32) (a bf16 SiLU-and-multiply kernel lost to torch's, 1.64 vs 0.93 ms at 512 rows, and was
removed). Rounds interleave every variant (a busy machine slows whole
seconds); prints the median and the spread (min-max of the per-round medians) in ms, and the ratio of
torch's op to the native one. The engine uses whichever is faster (docs/benchmarks.md, result 13).

    PYTHONPATH=. python benchmarks/bf16_kernels.py --threads 1 --rounds 5 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pdserve.models import attention, native
from pdserve.models.attention import AttentionMetadata
from pdserve.models.cpu_features import cpu_flags, cpu_isa
from pdserve.models.packed_linear import packing_supported
from pdserve.models.rope import rotate

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 576, 9, 3, 64, 16
BF16 = torch.bfloat16


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    """Per operation: the variants to time (native ones named by their bf16 path)."""
    torch.manual_seed(0)
    batch, context, chunk, short = 32, 1024, 512, 384
    num_pages = batch * (context + short) // PAGE + chunk // PAGE + 8
    order = torch.randperm(num_pages).tolist()
    decode_pages = [[order.pop() for _ in range(context // PAGE)] for _ in range(batch)]
    decode = AttentionMetadata.build(PAGE, decode_pages, [context] * batch, [], torch.device("cpu"))
    short_pages = [[order.pop() for _ in range(short // PAGE)] for _ in range(batch)]
    decode_short = AttentionMetadata.build(PAGE, short_pages, [short] * batch, [], torch.device("cpu"))
    prefill = AttentionMetadata.build(PAGE, [], [], [(0, chunk, [order.pop() for _ in range(chunk // PAGE)])],
                                      torch.device("cpu"))
    kv = torch.randn(num_pages, 2, PAGE, KV_HEADS, HEAD_DIM).to(BF16)
    q_dec, q_pre = torch.randn(batch, Q_HEADS, HEAD_DIM).to(BF16), torch.randn(chunk, Q_HEADS, HEAD_DIM).to(BF16)
    k_pre = torch.randn(chunk, KV_HEADS, HEAD_DIM).to(BF16)
    out_dec, out_pre = torch.empty_like(q_dec), torch.empty_like(q_pre)
    scale = HEAD_DIM**-0.5

    def native_attention(variant: str, q, meta, out):
        tables = meta.native_tables

        def run():
            native.bf16_variant(variant)
            native.paged_attention(q, kv, *tables, scale, out)
        return run

    def gather_decode(meta=decode, layer=kv):
        for group in meta.decode_groups:
            attention._decode_group(q_dec, layer, group, meta.workspace, scale, out_dec)

    kv_layers = [torch.randn(num_pages, 2, PAGE, KV_HEADS, HEAD_DIM).to(BF16) for _ in range(30)]

    def native_layers(variant: str, meta):
        tables = meta.native_tables

        def run():
            native.bf16_variant(variant)
            for layer in kv_layers:
                native.paged_attention(q_dec, layer, *tables, scale, out_dec)
        return run

    def sdpa_prefill():
        F.scaled_dot_product_attention(q_pre.transpose(0, 1), k_pre.transpose(0, 1), k_pre.transpose(0, 1),
                                       is_causal=True, scale=scale, enable_gqa=True)

    variants = [v for v in native.BF16_VARIANTS if v == "generic" or "avx512_bf16" in cpu_flags()]
    table: dict[str, dict[str, Callable[[], object]]] = {
        "decode attention 32 x 384": {**{f"native {v}": native_attention(v, q_dec, decode_short, out_dec)
                                         for v in variants},
                                      "torch gather + SDPA": lambda: gather_decode(decode_short)},
        # the engine's case: every layer's pages out of cache by the time it runs again (9.4 MB each)
        "decode attention 32 x 384, 30 layers' KV": {
            **{f"native {v}": native_layers(v, decode_short) for v in variants},
            "torch gather + SDPA": lambda: [gather_decode(decode_short, layer) for layer in kv_layers]},
        "decode attention 32 x 1024": {**{f"native {v}": native_attention(v, q_dec, decode, out_dec) for v in variants},
                                       "torch gather + SDPA": gather_decode},
        "prefill attention 512": {**{f"native {v}": native_attention(v, q_pre, prefill, out_pre) for v in variants},
                                  "torch SDPA": sdpa_prefill},
    }
    for rows in (32, 512):
        x, residual = torch.randn(rows, HIDDEN).to(BF16), torch.randn(rows, HIDDEN).to(BF16)
        weight = (torch.rand(HIDDEN) + 0.5).to(BF16)
        qkv = torch.randn(rows, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM).to(BF16)
        cos, sin = torch.randn(rows, 1, HEAD_DIM).to(BF16), torch.randn(rows, 1, HEAD_DIM).to(BF16)

        def torch_norm(x=x, residual=residual, weight=weight):
            summed = (x + residual).float()
            return weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5)).to(BF16)

        def torch_rope(qkv=qkv, cos=cos, sin=sin):
            heads = qkv.view(qkv.shape[0], -1, HEAD_DIM)
            return rotate(heads[:, : Q_HEADS + KV_HEADS], cos, sin)

        table[f"add + RMSNorm {rows} rows"] = {
            "native": lambda x=x, residual=residual, weight=weight: native.add_rms_norm(x.clone(), residual, weight, 1e-5),
            "torch": torch_norm}
        gate_up = torch.randn(rows, 2 * 1536).to(BF16)

        def torch_silu(gate_up=gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up

        table[f"SiLU-and-multiply {rows} rows"] = {"native": lambda gate_up=gate_up: native.silu_mul(gate_up),
                                                 "torch": torch_silu}
        table[f"RoPE q+k {rows} rows"] = {
            "native": lambda qkv=qkv, cos=cos, sin=sin: native.rope(qkv, cos, sin, Q_HEADS, KV_HEADS, HEAD_DIM),
            "torch": torch_rope}
    linears = {"qkv": (960, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (3072, HIDDEN), "down": (HIDDEN, 1536),
               "lm_head": (49152, HIDDEN)}
    for dtype in (BF16, torch.float32):
        if not packing_supported(dtype, torch.device("cpu")):
            continue
        for name, (out_f, in_f) in linears.items():
            weight = (torch.randn(out_f, in_f) * 0.02).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            for rows in (1, 32, 512):
                if name == "lm_head" and rows == 512:
                    continue  # the LM head sees the sampled rows only
                x = torch.randn(rows, in_f).to(dtype)
                table[f"linear {name} {rows} rows {str(dtype)[6:]}"] = {
                    "torch F.linear": lambda x=x, weight=weight: F.linear(x, weight),
                    "oneDNN packed": lambda x=x, packed=packed: torch.ops.mkldnn._linear_pointwise(
                        x, packed, None, "none", [], "")}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every variant")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per variant per round (median kept)")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    parser.add_argument("--output-file", default="benchmarks/results/bf16_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if native.kernels() is None:
        raise SystemExit("native kernels unavailable (no C compiler)")
    chosen = native.bf16_variant()
    table = cases()
    rounds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for op, variants in table.items():
            for name, fn in variants.items():
                fn()
                times = []
                for _ in range(args.calls):
                    start = clock()
                    fn()
                    times.append(clock() - start)
                rounds[(op, name)].append(statistics.median(times) * 1e3)
    native.bf16_variant(chosen)
    print(f"cpu_isa {cpu_isa()}, {args.threads} threads, {args.clock} clock, {args.rounds} rounds x {args.calls} calls, "
          f"load average {os.getloadavg()[0]:.1f}; ms: median of rounds [min-max]")
    results = []
    for op, variants in table.items():
        medians = {name: statistics.median(rounds[(op, name)]) for name in variants}
        torch_name = next(name for name in variants if name.startswith("torch"))
        best = min(medians, key=medians.get)
        line = "; ".join(f"{name} {medians[name]:.3f} [{min(rounds[(op, name)]):.3f}-{max(rounds[(op, name)]):.3f}]"
                         for name in variants)
        print(f"{op:28s} {line}; torch / best = {medians[torch_name] / medians[best]:.2f}x (faster: {best})")
        results.append({"op": op, "rounds_ms": {name: rounds[(op, name)] for name in variants},
                        "median_ms": medians, "faster": best})
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_file).write_text(json.dumps({"cpu_isa": cpu_isa(), "threads": args.threads,
                                                  "clock": args.clock, "load_average": os.getloadavg(),
                                                  "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
