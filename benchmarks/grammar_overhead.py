#!/usr/bin/env python
"""Structured output: decode tokens/s with a grammar vs without, the tiny model, offline engine.

The same batch (``--batch`` prompts, ``--max-new-tokens`` each, ``ignore_eos`` so every row runs
the full length) is generated without a grammar and with each grammar below, alternating for
``--repeats`` rounds in one process (so machine load hits every variant alike). A grammar here
never completes before the length limit (an unbounded JSON array of integers, a long regex),
so each row pays the llguidance mask at every step. Reported: tokens/s (median over rounds) and
the overhead per decode step per row, ``(1/tps_grammar - 1/tps_plain) * batch``; then the grammar
step alone (mask + advance, no model) in ms per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pdserve import Engine

GRAMMARS = {
    "none": {},
    "json_schema": {"json_schema": json.dumps({"type": "array", "items": {"type": "integer"}})},
    "regex": {"regex": "([a-z]+ [0-9]+, )+"},
}
PROMPTS = ["Hello world", "Once upon a time", "def add(a, b):", "The capital of France", "1, 2, 3, 4,",
           "A long time ago", "Dear diary", "The quick brown fox"]


def mask_cost_ms(batch: int, steps: int = 200) -> float:
    """The grammar step alone (mask into the logits, then advance each matcher), ms per row."""
    import torch

    from pdserve.engine.grammar import GrammarCompiler, advance_grammar, apply_grammar_masks
    from pdserve.engine.request import Req, SamplingParams
    from pdserve.models import tiny
    from pdserve.models.tokenizer import Tokenizer

    tok = Tokenizer(tiny.default_model_path())
    compiler = GrammarCompiler(tok.to_json(), tiny.VOCAB_SIZE, [tok.eos_token_id or 0])
    params = SamplingParams(json_schema=GRAMMARS["json_schema"]["json_schema"])
    reqs = [Req(rid=str(i), input_ids=[1], params=params, grammar=compiler.matcher(params)) for i in range(batch)]
    logits = torch.randn(batch, tiny.VOCAB_SIZE)
    start = time.perf_counter()
    for _ in range(steps):
        masked = logits.clone()
        apply_grammar_masks(masked, reqs)
        for req, token in zip(reqs, masked.argmax(-1).tolist()):
            advance_grammar(req, token)
    return (time.perf_counter() - start) / steps / batch * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args()
    engine = Engine(max_total_tokens=16384, page_size=16, torch_threads=args.threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    rates: dict[str, list[float]] = {name: [] for name in GRAMMARS}
    try:
        engine.generate(prompts, sampling_params={"max_new_tokens": 4})  # warm up
        for _ in range(args.repeats):
            for name, extra in GRAMMARS.items():
                params = {"max_new_tokens": args.max_new_tokens, "ignore_eos": True, "temperature": 1.0,
                          "seed": 1, **extra}
                start = time.perf_counter()
                outs = engine.generate(prompts, sampling_params=params)
                elapsed = time.perf_counter() - start
                tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
                rates[name].append(tokens / elapsed)
    finally:
        engine.shutdown()
    plain = statistics.median(rates["none"])
    result = {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rows": []}
    print(f"{'grammar':<12} {'tok/s':>8} {'vs none':>8} {'ms/step/row':>12}")
    for name, values in rates.items():
        tps = statistics.median(values)
        per_row_ms = (1 / tps - 1 / plain) * args.batch * 1000
        result["rows"].append({"grammar": name, "tokens_per_s": tps, "ratio": tps / plain,
                               "overhead_ms_per_step_per_row": per_row_ms, "all": values})
        print(f"{name:<12} {tps:8.1f} {tps / plain:8.2f} {per_row_ms:12.3f}")
    result["mask_and_advance_ms_per_row"] = mask_cost_ms(args.batch)
    print(f"grammar step alone (json_schema, batch {args.batch}): {result['mask_and_advance_ms_per_row']:.3f} ms/row")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
