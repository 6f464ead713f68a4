"""``pdserve generate``: run prompts through the offline engine and print the completions."""

from __future__ import annotations

import argparse
import json

from pdserve.engine.config import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: keep the smallest set of tokens whose probability reaches P")
    parser.add_argument("--top-k", type=int, default=-1, help="keep the K most likely tokens (-1: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: none, the engine's --random-seed stream)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--json", action="store_true", help="print the full SGLang-shaped result as JSON")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pdserve.engine.engine import Engine

    config = engine_config_from_args(args)
    options = {k: v for k, v in asdict(config).items() if k != "model_path"}
    engine = Engine(config.model_path, **options)
    prompts = args.prompt
    if args.chat:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    results = engine.generate(prompt=prompts, sampling_params=params)
    for prompt, result in zip(args.prompt, results):
        if args.json:
            print(json.dumps(result))
        else:
            meta = result["meta_info"]
            print(f"=== {prompt!r} ({meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated, "
                  f"finish {meta['finish_reason']})")
            print(result["text"])
    engine.shutdown()
    return 0
