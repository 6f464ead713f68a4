"""``pdserve bench profile``: time pdserve's real engine step by step and fit the profiled cost
model that ``--simulate profile:FILE`` uses (:mod:`pdserve.sim.profiled`).

Runs batches of requests (mixed prompt lengths, several batch sizes) through one
:class:`~pdserve.engine.engine_core.EngineCore` with the server's engine flags, records each
step's shape and wall time (the whole ``step()``: scheduling, forward and sampling), fits the
linear model and writes it with its fit error.

``--from-trace FILE...`` fits instead from the ``--step-trace`` files of served engines (real
servers under a workload, where the front, the router, the other role's engine and the KV
transfer compete for the same cores): a step that carries on the previous one's work (the engine
was busy in between) costs the time from the previous forward's end to its own end — the whole
loop, as the sim's clock counts a step — and a step after an idle wait its own forward time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from pdserve.engine.config import EngineConfig, add_engine_arguments, engine_config_from_args
from pdserve.sim.cost_model import StepShape
from pdserve.sim.profiled import FORMAT, ProfiledCost, fit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--output", required=True, help="profile JSON to write")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated concurrent requests per round")
    parser.add_argument("--prompt-len", default="16,400", help="min,max prompt tokens (uniform)")
    parser.add_argument("--output-len", type=int, default=24, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--from-trace", nargs="+", default=None, metavar="FILE",
                        help="fit from these --step-trace files of served engines instead of timing an engine "
                             "here (default: time an engine here)")


def profile(config: EngineConfig, batch_sizes: list[int], prompt_len: tuple[int, int], output_len: int,
            repeats: int, seed: int) -> tuple[list[tuple[StepShape, float]], int]:
    from pdserve.engine.engine_core import EngineCore
    from pdserve.engine.request import Req, SamplingParams

    core = EngineCore(config)
    shapes: list[StepShape] = []
    forward = core.runner.forward

    def recording_forward(batch):
        shapes.append(StepShape([r.seq_len for r in batch.decodes], [(c.start, c.length) for c in batch.extends]))
        return forward(batch)

    core.runner.forward = recording_forward
    rng = random.Random(seed)
    samples: list[tuple[StepShape, float]] = []
    vocab = core.vocab_size
    for rep in range(repeats + 1):  # round 0 warms up and is not recorded
        for b in batch_sizes:
            for i in range(b):
                n = rng.randint(*prompt_len)
                core.add_request(Req(f"p{rep}-{b}-{i}", [rng.randrange(4, vocab) for _ in range(n)],
                                     SamplingParams(max_new_tokens=output_len, ignore_eos=True, temperature=0)))
            while core.has_work():
                shapes.clear()
                start = time.perf_counter()
                core.step()
                elapsed = time.perf_counter() - start
                if rep and shapes:
                    samples.append((shapes[0], elapsed))
    return samples, core.max_total_tokens


def continues(step: dict, previous: dict) -> bool:
    """Whether ``step`` carries on work of ``previous`` (a decode one token further, or the next
    chunk of a prompt), i.e. the engine was busy in between rather than idle."""
    next_positions = {c + 1 for c in previous["decodes"]} | {s + n + 1 for s, n in previous["extends"]}
    next_chunks = {s + n for s, n in previous["extends"]}
    return any(c in next_positions for c in step["decodes"]) or any(s in next_chunks for s, _ in step["extends"])


def trace_samples(paths: list[str]) -> tuple[list[tuple[StepShape, float]], int | None]:
    """Step costs from served engines' step traces (see the module docstring), and the smallest
    KV capacity among them."""
    from pdserve.engine.step_trace import read_trace

    samples: list[tuple[StepShape, float]] = []
    capacities = []
    for path in paths:
        header, steps = read_trace(path)
        capacities.append(header.get("kv_capacity_tokens"))
        previous = None
        for step in steps:
            begin = previous["end"] if previous is not None and continues(step, previous) else step["start"]
            samples.append((StepShape(step["decodes"], [tuple(e) for e in step["extends"]]), step["end"] - begin))
            previous = step
    known = [c for c in capacities if isinstance(c, int)]
    return samples, min(known) if known else None


def run(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    if args.from_trace:
        try:
            samples, capacity = trace_samples(args.from_trace)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--from-trace: cannot read the step traces: {e}") from e
        if len(samples) < 10:
            raise SystemExit(f"--from-trace: {len(samples)} steps in {', '.join(args.from_trace)}; need at least 10")
        if config.max_total_tokens is not None:
            capacity = config.max_total_tokens
    else:
        low, high = (int(x) for x in args.prompt_len.split(","))
        samples, capacity = profile(config, [int(x) for x in args.batch_sizes.split(",")], (low, high),
                                    args.output_len, args.repeats, args.seed)
    coef = fit(samples)
    model = ProfiledCost(coef, capacity)
    errors = [abs(model.step_seconds(s) - t) / t for s, t in samples]
    result = {
        "format": FORMAT,
        "model_path": config.model_path,
        "engine": {"page_size": config.page_size, "chunked_prefill_size": config.chunked_prefill_size,
                   "torch_threads": config.torch_threads, "dtype": config.dtype},
        "coefficients": coef,
        "kv_capacity_tokens": capacity,
        "source": {"traces": args.from_trace} if args.from_trace else "engine timed alone",
        "samples": len(samples),
        "fit_error": {"median": statistics.median(errors), "p90": sorted(errors)[int(0.9 * len(errors))]},
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("coefficients", "samples", "fit_error")}, indent=2))
    return 0
