"""Offline throughput: pdserve's engine vs transformers ``generate`` (static batches) and, where the
installed transformers has it, ``generate_batch`` (its continuous batching), on the same prompts,
thread count and machine, in one run. Prints absolute numbers and ratios."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS: dict[str, dict[str, Any] | None] = {
    "tiny": None,  # the embedded default model
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.05),
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
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, **spec)
    model = transformers.LlamaForCausalLM(config)
    out = workdir / name
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    return str(out)


def workload(n: int, vocab: int, seed: int, in_range: tuple[int, int], out_range: tuple[int, int]):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    outputs = [rng.randint(*out_range) for _ in range(n)]
    return prompts, outputs


def run_pdserve(path: str, prompts, outputs) -> float:
    from pdserve.engine.engine import Engine

    engine = Engine(path, page_size=16, chunked_prefill_size=512, max_running_requests=256,
                    max_total_tokens=sum(len(p) + o for p, o in zip(prompts, outputs)) + 1024)
    params = [{"max_new_tokens": o, "ignore_eos": True, "temperature": 0} for o in outputs]
    engine.generate(input_ids=prompts[:2], sampling_params=params[:2])  # warm-up
    start = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - start


def run_hf_static(model, prompts, outputs, batch_size: int) -> float:
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        chunk, outs = prompts[s : s + batch_size], outputs[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run_hf_continuous(model, prompts, outputs) -> float | None:
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    model.generate_batch(inputs=prompts, generation_config=cfg)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=list(MODELS))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=(128, 512))
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-continuous", action="store_true", help="skip transformers generate_batch")
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pdserve.models.loader import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = build_model(name, Path(tmp))
            loaded = load_model(path)
            prompts, outputs = workload(args.num_prompts, loaded.config.vocab_size, 0,
                                        tuple(args.input_len), tuple(args.output_len))
            del loaded
            useful = sum(outputs)
            result: dict[str, Any] = {"model": name, "num_prompts": args.num_prompts, "output_tokens": useful}
            result["pdserve_s"] = run_pdserve(path, prompts, outputs)
            print(f"[{name}] pdserve engine: {useful / result['pdserve_s']:.1f} tok/s", flush=True)
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for bs in args.hf_batch_sizes:
                result[f"hf_generate_b{bs}_s"] = secs = run_hf_static(hf, prompts, outputs, bs)
                print(f"[{name}] transformers generate b{bs}: {useful / secs:.1f} tok/s", flush=True)
            if not args.no_continuous:
                try:
                    result["hf_generate_batch_s"] = run_hf_continuous(hf, prompts, outputs)
                except Exception as exc:  # an optional peer: report why it could not run
                    result["hf_generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(result)
            _print_row(result, args.hf_batch_sizes)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(rows, indent=2))
    return 0


def _print_row(r: dict[str, Any], batch_sizes: list[int]) -> None:
    tok = r["output_tokens"]
    ours = tok / r["pdserve_s"]
    print(f"\n== model {r['model']}: {r['num_prompts']} requests, {tok} output tokens (useful)")
    print(f"  pdserve engine            {ours:8.1f} tok/s  ({r['pdserve_s']:.1f} s)")
    peers = [(f"transformers generate b{bs}", r[f"hf_generate_b{bs}_s"]) for bs in batch_sizes]
    if r.get("hf_generate_batch_s"):
        peers.append(("transformers generate_batch", r["hf_generate_batch_s"]))
    for label, secs in peers:
        print(f"  {label:26s}{tok / secs:8.1f} tok/s  ({secs:.1f} s)   pdserve / this = {secs / r['pdserve_s']:.2f}x")
    if "hf_generate_batch_error" in r:
        print(f"  transformers generate_batch: not run ({r['hf_generate_batch_error']})")


if __name__ == "__main__":
    raise SystemExit(main())
