"""Offline throughput: pdserve's engine vs transformers ``generate`` (static batches) and, where the
installed transformers has it, ``generate_batch`` (its continuous batching), on the same prompts,
thread count and machine, in one run. Prints absolute numbers and ratios, and the engine's model
FLOPs utilisation: the workload's model FLOPs / engine wall time / the GEMM peak measured in the run.

``--dtype bfloat16 float32`` runs every system in each dtype, rounds interleaved, and adds the engine's
bf16 / fp32 speed-up and the MFU against the fastest GEMM peak measured (bf16's on a CPU with AMX).
Each row names the dtype and instruction-set path the engine ran (``compute_path``).

``--clock cpu`` times every system (and the GEMM peak) by the process's CPU time instead of wall time:
on a machine shared with other work, CPU time is far less disturbed (use it with ``--threads 1``,
where no thread waits for a descheduled sibling)."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODELS: dict[str, dict[str, Any] | None] = {
    "tiny": None,  # the embedded default model
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.05),
    # SmolLM2-135M's shape with random weights
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                 rope_theta=100000.0, max_position_embeddings=2048, initializer_range=0.02),
    # a ~1B Llama shape (Llama-3.2-1B's), for GPU runs
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=4096, initializer_range=0.02),
}


def build_model(name: str, workdir: Path) -> str:
    from pdserve.models.tiny import default_model_path

    spec = MODELS[name]
    if spec is None:
        return default_model_path()
    import shutil

    import transformers

    from pdserve.models.tokenizer import Tokenizer

    tok_dir = Path(default_model_path())
    tok = Tokenizer(tok_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id, **spec})
    model = transformers.LlamaForCausalLM(config)
    out = workdir / name
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # as the public checkpoints ship
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    return str(out)


def workload(n: int, vocab: int, seed: int, in_range: tuple[int, int], out_range: tuple[int, int]):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    outputs = [rng.randint(*out_range) for _ in range(n)]
    return prompts, outputs


def workload_flops(cfg, prompts, outputs) -> float:
    """Model FLOPs of serving the workload: 2 x weights per token through the layers, the LM head
    once per sampled token, and attention scores plus values over each token's causal context."""
    q, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) * d + q * d * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    tokens = sum(len(p) + o - 1 for p, o in zip(prompts, outputs))  # the last output token is never fed back
    context = sum(sum(range(1, len(p) + o)) for p, o in zip(prompts, outputs))  # sum over tokens of context length
    sampled = sum(outputs)
    return (2 * per_layer * cfg.num_layers * tokens + 2 * cfg.hidden_size * cfg.vocab_size * sampled
            + 4 * q * d * cfg.num_layers * context)


CLOCK: Callable[[], float] = time.perf_counter  # set by --clock


GEMM_PEAK_SIZE = {"cpu": 1024, "cuda": 8192}  # a 1024^3 GEMM takes microseconds on a GPU: launch-bound


def gemm_peak(dtype: torch.dtype, device: torch.device, size: int | None = None, repeats: int = 8) -> float:
    """Best FLOP/s of a square matmul over several tries (the machine's GEMM peak for this dtype), on
    ``device``; the size defaults to one that keeps the device busy (:data:`GEMM_PEAK_SIZE`)."""
    size = size or GEMM_PEAK_SIZE.get(device.type, 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = CLOCK()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, CLOCK() - start)
    return 2 * size**3 / best


def run_pdserve(path: str, prompts, outputs, dtype: str | None = None, device: str | None = None,
                **options: Any) -> tuple[float, list[list[int]], dict[str, str]]:
    """Seconds, greedy outputs and compute path (dtype, ISA) of the offline engine (``options``: more
    :class:`EngineConfig` fields)."""
    from pdserve.engine.engine import Engine

    options.setdefault("chunked_prefill_size", 512)
    engine = Engine(path, page_size=16, max_running_requests=256, dtype=dtype,
                    device=device, max_total_tokens=sum(len(p) + o for p, o in zip(prompts, outputs)) + 1024,
                    **options)
    params = [{"max_new_tokens": o, "ignore_eos": True, "temperature": 0} for o in outputs]
    engine.generate(input_ids=prompts[:2], sampling_params=params[:2])  # warm-up
    start = CLOCK()
    results = engine.generate(input_ids=prompts, sampling_params=params)
    secs = CLOCK() - start
    graphs = engine.core.runner.decode_graphs
    if graphs is not None:
        widths = {w * graphs.page_size: n for w, n in sorted(graphs.width_runs.items())}
        print(f"  decode graphs: {len(graphs.graphs)} captured; {sum(graphs.runs.values())} steps over the buffers "
              f"(steps per width in tokens: {widths}), {graphs.declined} decode steps eager", flush=True)
    engine.core.kv_pool.check_integrity(expect_used=0)  # no page leaked, the graphs' scratch page apart
    path_info = dict(engine.core.compute_path)
    engine.shutdown()
    return secs, [r["output_ids"] for r in results], path_info


def run_hf_static(model, prompts, outputs, batch_size: int) -> tuple[float, list[list[int]]]:
    device = model.device
    generated: list[list[int]] = []
    start = CLOCK()
    for s in range(0, len(prompts), batch_size):
        chunk, outs = prompts[s : s + batch_size], outputs[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                             do_sample=False, pad_token_id=0)
        generated.extend(row[width : width + n] for row, n in zip(out.tolist(), outs))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return CLOCK() - start, generated


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float]:
    """Share of requests with identical greedy output, and share of output tokens generated before
    the first divergence (later tokens continue from different text, so they are not compared)."""
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = 0
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    return same / len(ours), prefix / sum(len(b) for b in theirs)


def run_hf_continuous(model, prompts, outputs) -> float | None:
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=0)
    start = CLOCK()
    model.generate_batch(inputs=prompts, generation_config=cfg)
    return CLOCK() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=list(MODELS),
                        help="model shapes to build (random weights) and run")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per model")
    parser.add_argument("--input-len", type=int, nargs=2, default=(128, 512), metavar=("MIN", "MAX"),
                        help="prompt length range, uniform")
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"),
                        help="output length range, uniform")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64],
                        help="batch sizes of the static transformers generate() runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-continuous", action="store_true", help="skip transformers generate_batch")
    parser.add_argument("--dtype", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                        help="dtypes to run every system in, rounds interleaved (auto: what the engine's --dtype auto "
                             "picks for the checkpoint, saved in bf16: bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 "
                             "and on CUDA, float32 on other CPUs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--disable-cuda-graph", action="store_true",
                        help="CUDA: the engine decodes without CUDA graphs (default: with them)")
    parser.add_argument("--also-eager", action="store_true",
                        help="CUDA: also time the engine without CUDA graphs in the same run and print the "
                             "eager / graphs time ratio (default: off)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or the process's CPU time (shared machines)")
    parser.add_argument("--chunked-prefill-size", type=int, default=512,
                        help="the engine's prefill chunk in tokens (the server's default; vLLM's offline CPU default "
                             "is 4096; transformers' static batches take whole prompts) (default: 512)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the engine and every transformers batch size, interleaved (a noisy machine "
                             "slows whole minutes): medians and per-round ratios are reported (default: 1)")
    parser.add_argument("--output-file", default=None, help="also write the results as JSON here")


def main(argv: list[str] | None = None) -> int:
    from pdserve.cli_help import HelpFormatter

    parser = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    from pdserve.models.config import ModelConfig, resolve_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = build_model(name, Path(tmp))
            cfg = ModelConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))  # no weights loaded
            dtypes = list(dict.fromkeys(str(resolve_dtype(d, device, cfg.dtype).dtype).removeprefix("torch.")
                                        for d in args.dtype))
            prompts, outputs = workload(args.num_prompts, cfg.vocab_size, 0,
                                        tuple(args.input_len), tuple(args.output_len))
            results = {d: _new_result(name, d, device, args, cfg, prompts, outputs) for d in dtypes}
            for round_ in range(max(1, args.repeats)):
                for dtype_name in dtypes:  # every dtype in every round: a slow minute hits all of them
                    _run_round(results[dtype_name], round_, path, prompts, outputs, device, args)
            for result in results.values():  # the peak again after the rounds; the best of both tries counts
                result["gemm_peak_flops"] = max(result["gemm_peak_flops"], gemm_peak(getattr(torch, result["dtype"]),
                                                                                      device))
            peak = max(r["gemm_peak_flops"] for r in results.values())
            for dtype_name in dtypes:
                result = results[dtype_name]
                result.pop("_hf", None)
                _finish(result, peak)
                rows.append(result)
                _print_row(result, args.hf_batch_sizes)
            if {"bfloat16", "float32"} <= set(dtypes):
                _print_dtype_ratio(results["bfloat16"], results["float32"], args.hf_batch_sizes)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(rows, indent=2))
    return 0


def _new_result(name: str, dtype_name: str, device: torch.device, args: argparse.Namespace, cfg, prompts,
                outputs) -> dict[str, Any]:
    return {"model": name, "num_prompts": args.num_prompts, "output_tokens": sum(outputs), "dtype": dtype_name,
            "device": device.type, "threads": args.threads, "clock": args.clock, "load_average": os.getloadavg(),
            "chunked_prefill_size": args.chunked_prefill_size,
            "cuda_graph": device.type == "cuda" and not args.disable_cuda_graph,
            "model_flops": workload_flops(cfg, prompts, outputs),
            "gemm_peak_flops": gemm_peak(getattr(torch, dtype_name), device),
            "pdserve_runs_s": [], **{f"hf_generate_b{bs}_runs_s": [] for bs in args.hf_batch_sizes}}


def _run_round(result: dict[str, Any], round_: int, path: str, prompts, outputs, device: torch.device,
               args: argparse.Namespace) -> None:
    """One round in one dtype: the engine, then transformers at every batch size."""
    name, dtype_name, useful = result["model"], result["dtype"], result["output_tokens"]
    secs, ours, result["compute_path"] = run_pdserve(path, prompts, outputs, dtype_name, str(device),
                                                     disable_cuda_graph=args.disable_cuda_graph,
                                                     chunked_prefill_size=args.chunked_prefill_size)
    result["pdserve_runs_s"].append(secs)
    if round_ == 0 and args.also_eager and result["cuda_graph"]:
        result["pdserve_eager_s"], eager, _ = run_pdserve(path, prompts, outputs, dtype_name, str(device),
                                                          disable_cuda_graph=True,
                                                          chunked_prefill_size=args.chunked_prefill_size)
        result["eager_identical_requests"], _ = agreement(eager, ours)
    print(f"[{name} {dtype_name}] round {round_ + 1}: pdserve engine {useful / secs:.1f} tok/s", flush=True)
    if result.get("_hf") is None:
        import transformers

        result["_hf"] = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype_name)).to(device).eval()
    for bs in args.hf_batch_sizes:
        secs, theirs = run_hf_static(result["_hf"], prompts, outputs, bs)
        result[f"hf_generate_b{bs}_runs_s"].append(secs)
        print(f"[{name} {dtype_name}] round {round_ + 1}: transformers generate b{bs}: {useful / secs:.1f} tok/s",
              flush=True)
        if "greedy_identical_requests" not in result:
            result["greedy_identical_requests"], result["greedy_agreeing_tokens"] = agreement(ours, theirs)
    if round_ == 0 and not args.no_continuous:
        try:
            result["hf_generate_batch_s"] = run_hf_continuous(result["_hf"], prompts, outputs)
        except Exception as exc:  # an optional peer: report why it could not run
            result["hf_generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:200]


def _finish(result: dict[str, Any], best_peak: float) -> None:
    """Medians, per-round ratios and MFU (against this dtype's GEMM peak and the run's fastest)."""
    ours_runs = result["pdserve_runs_s"]
    result["pdserve_s"] = statistics.median(ours_runs)
    for key in [k for k in result if k.startswith("hf_generate_b") and k.endswith("_runs_s")]:
        bs = key.removeprefix("hf_generate_b").removesuffix("_runs_s")
        result[f"hf_generate_b{bs}_s"] = statistics.median(result[key])
        result[f"ratio_b{bs}_per_round"] = [h / o for h, o in zip(result[key], ours_runs)]
    result["best_gemm_peak_flops"] = best_peak
    result["mfu"] = result["model_flops"] / result["pdserve_s"] / result["gemm_peak_flops"]
    result["mfu_vs_best_peak"] = result["model_flops"] / result["pdserve_s"] / result["best_gemm_peak_flops"]


def _print_dtype_ratio(bf16: dict[str, Any], fp32: dict[str, Any], batch_sizes: list[int]) -> None:
    per_round = [f / b for f, b in zip(fp32["pdserve_runs_s"], bf16["pdserve_runs_s"])]
    print(f"\n== {bf16['model']}: pdserve bf16 / pdserve fp32 = {fp32['pdserve_s'] / bf16['pdserve_s']:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    for bs in batch_sizes:
        print(f"  pdserve bf16 / transformers bf16 b{bs} = {bf16[f'hf_generate_b{bs}_s'] / bf16['pdserve_s']:.2f}x; "
              f"/ transformers fp32 b{bs} = {fp32[f'hf_generate_b{bs}_s'] / bf16['pdserve_s']:.2f}x")


def _print_row(r: dict[str, Any], batch_sizes: list[int]) -> None:
    tok = r["output_tokens"]
    ours = tok / r["pdserve_s"]
    print(f"\n== model {r['model']}: {r['num_prompts']} requests, {tok} output tokens (useful)")
    from pdserve.models.cpu_features import describe

    print(f"  pdserve engine            {ours:8.1f} tok/s  ({r['pdserve_s']:.1f} s)  {describe(r['compute_path'])}, "
          f"{r['threads']} threads, {r['clock']} clock, prefill chunk {r.get('chunked_prefill_size', 512)}, "
          f"load average {r['load_average'][0]:.1f}")
    print(f"  model FLOPs {r['model_flops'] / 1e12:.2f} T; {r['dtype']} GEMM peak {r['gemm_peak_flops'] / 1e9:.1f} "
          f"GFLOP/s (measured in this run); MFU {100 * r['mfu']:.1f} %, "
          f"{100 * r['mfu_vs_best_peak']:.1f} % of the run's fastest peak ({r['best_gemm_peak_flops'] / 1e9:.1f} GFLOP/s)")
    peers = [(f"transformers generate b{bs}", r[f"hf_generate_b{bs}_s"]) for bs in batch_sizes]
    best = min(secs for _, secs in peers)
    print(f"  pdserve / transformers generate's best batch size = {best / r['pdserve_s']:.2f}x")
    if r.get("hf_generate_batch_s"):
        peers.append(("transformers generate_batch", r["hf_generate_batch_s"]))
    for label, secs in peers:
        print(f"  {label:26s}{tok / secs:8.1f} tok/s  ({secs:.1f} s)   pdserve / this = {secs / r['pdserve_s']:.2f}x")
    if len(r.get("pdserve_runs_s", [])) > 1:
        runs = r["pdserve_runs_s"]
        print(f"  {len(runs)} rounds (medians above); pdserve engine {min(runs):.2f}-{max(runs):.2f} s")
        for bs in batch_sizes:
            ratios = ", ".join(f"{x:.2f}" for x in r[f"ratio_b{bs}_per_round"])
            hf_runs = r[f"hf_generate_b{bs}_runs_s"]
            print(f"  transformers generate b{bs} {min(hf_runs):.2f}-{max(hf_runs):.2f} s; "
                  f"pdserve / b{bs} per round: {ratios}")
    if "pdserve_eager_s" in r:
        print(f"  pdserve engine, no CUDA graphs {tok / r['pdserve_eager_s']:8.1f} tok/s  ({r['pdserve_eager_s']:.1f} s)"
              f"   eager / graphs time = {r['pdserve_eager_s'] / r['pdserve_s']:.2f}x; "
              f"{100 * r['eager_identical_requests']:.0f} % of requests identical to the graph run")
    if "greedy_identical_requests" in r:
        print(f"  greedy agreement with transformers ({r['dtype']}): {100 * r['greedy_identical_requests']:.0f} % of "
              f"requests identical, {100 * r['greedy_agreeing_tokens']:.1f} % of tokens before the first divergence")
    if "hf_generate_batch_error" in r:
        print(f"  transformers generate_batch: not run ({r['hf_generate_batch_error']})")


if __name__ == "__main__":
    raise SystemExit(main())
