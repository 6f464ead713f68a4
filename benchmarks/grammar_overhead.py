#!/usr/bin/env python
"""Structured output: decode tokens/s with a grammar vs without, the tiny model, offline engine.

The same batch (``--batch`` prompts, ``--max-new-tokens`` each, ``ignore_eos`` so every row runs
the full length) is generated without a grammar and with each grammar below, alternating for
``--repeats`` rounds in one process (so machine load hits every variant alike). A grammar here
never completes before the length limit (a JSON array of at least 1,024 integers, a long regex),
so each row pays the llguidance mask at every step. ``json_schema/rows`` is the JSON schema again
with the masks computed the old way, row by row (:func:`row_by_row_masks`, the peer of the batched
:func:`~pdserve.engine.grammar.apply_grammar_masks`). Reported: tokens/s (median over rounds) and
the time a grammar adds per decode step of the whole batch, ``(1/tps_grammar - 1/tps_plain) * batch``; then the grammar
step alone (mask + advance, no model) in ms per row, batched vs row by row, for several batch sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch

import pdserve.engine.sampler as sampler
from pdserve import Engine
from pdserve.engine.grammar import apply_grammar_masks

# At least 1,024 items: the array cannot close (and the grammar complete, ending the row early,
# which would shrink the batch and pass for grammar overhead) before --max-new-tokens up to 2,047.
ARRAY_SCHEMA = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 1024})
GRAMMARS = {
    "none": {},
    "json_schema": {"json_schema": ARRAY_SCHEMA},
    "json_schema/rows": {"json_schema": ARRAY_SCHEMA},
    "regex": {"regex": "([a-z]+ [0-9]+, )+"},
}
MASK_BATCHES = (1, 8, 32)


def row_by_row_masks(logits: torch.Tensor, reqs) -> None:
    """The peer: each row's mask computed by its own llguidance call and applied row by row."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bits = np.zeros((len(rows), words), dtype=np.int32)
    for k, row in enumerate(rows):
        reqs[row].grammar.unsafe_compute_mask_ptr(bits[k].ctypes.data, words * 4)
    allowed = torch.from_numpy(np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool))
    for k, row in enumerate(rows):
        ok = allowed[k]
        if not bool(ok.any()):
            continue
        masked = logits[row].masked_fill(~ok, float("-inf"))
        if bool(torch.isinf(masked).all()):
            masked = torch.zeros_like(masked).masked_fill(~ok, float("-inf"))
        logits[row] = masked


@contextlib.contextmanager
def masks(row_by_row: bool):
    """The sampler's mask function for a block: the batched one, or the row-by-row peer."""
    sampler.apply_grammar_masks = row_by_row_masks if row_by_row else apply_grammar_masks
    try:
        yield
    finally:
        sampler.apply_grammar_masks = apply_grammar_masks
PROMPTS = ["Hello world", "Once upon a time", "def add(a, b):", "The capital of France", "1, 2, 3, 4,",
           "A long time ago", "Dear diary", "The quick brown fox"]


def mask_cost_ms(batch: int, row_by_row: bool, steps: int = 100) -> float:
    """The grammar step alone (mask into the logits, then advance each matcher), ms per row."""
    from pdserve.engine.grammar import GrammarCompiler, advance_grammar
    from pdserve.engine.request import Req, SamplingParams
    from pdserve.models import tiny
    from pdserve.models.tokenizer import Tokenizer

    tok = Tokenizer(tiny.default_model_path())
    compiler = GrammarCompiler(tok.to_json(), tiny.VOCAB_SIZE, [tok.eos_token_id or 0])
    params = SamplingParams(json_schema=GRAMMARS["json_schema"]["json_schema"])
    reqs = [Req(rid=str(i), input_ids=[1], params=params, grammar=compiler.matcher(params)) for i in range(batch)]
    logits = torch.randn(batch, tiny.VOCAB_SIZE)
    apply = row_by_row_masks if row_by_row else apply_grammar_masks
    start = time.perf_counter()
    for _ in range(steps):
        masked = logits.clone()
        apply(masked, reqs)
        for req, token in zip(reqs, masked.argmax(-1).tolist()):
            advance_grammar(req, token)
    return (time.perf_counter() - start) / steps / batch * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (ignore_eos)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and llguidance's pool)")
    parser.add_argument("--output-file", default=None, help="also write the results as JSON here")
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
                with masks(row_by_row=name.endswith("/rows")):
                    start = time.perf_counter()
                    outs = engine.generate(prompts, sampling_params=params)
                    elapsed = time.perf_counter() - start
                tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
                if tokens != args.max_new_tokens * len(prompts):
                    raise SystemExit(f"{name}: a row ended before --max-new-tokens ({tokens} tokens in all), "
                                     "so the batch shrank and tokens/s would not measure grammar overhead")
                rates[name].append(tokens / elapsed)
    finally:
        engine.shutdown()
    plain = statistics.median(rates["none"])
    result = {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rows": []}
    print(f"{'grammar':<17} {'tok/s':>8} {'vs none':>8} {'+ms/step':>12}  rounds")
    for name, values in rates.items():
        tps = statistics.median(values)
        added_ms = (1 / tps - 1 / plain) * args.batch * 1000
        result["rows"].append({"grammar": name, "tokens_per_s": tps, "ratio": tps / plain,
                               "added_ms_per_step": added_ms, "all": values})
        print(f"{name:<17} {tps:8.1f} {tps / plain:8.2f} {added_ms:12.3f}  "
              + ", ".join(f"{v:.1f}" for v in values))
    result["grammar_step_ms_per_row"] = {}
    print("grammar step alone (json_schema; mask + advance, no model), ms per row, median of "
          f"{args.repeats} (batched / row by row):")
    for batch in MASK_BATCHES:
        times: dict[str, list[float]] = {"batched": [], "row_by_row": []}
        for _ in range(args.repeats):
            times["batched"].append(mask_cost_ms(batch, row_by_row=False))
            times["row_by_row"].append(mask_cost_ms(batch, row_by_row=True))
        result["grammar_step_ms_per_row"][str(batch)] = times
        ours, theirs = statistics.median(times["batched"]), statistics.median(times["row_by_row"])
        print(f"  batch {batch:3d}: {ours:.3f} / {theirs:.3f}  (x{theirs / ours:.2f})  "
              f"all: {[round(t, 3) for t in times['batched']]} / {[round(t, 3) for t in times['row_by_row']]}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
