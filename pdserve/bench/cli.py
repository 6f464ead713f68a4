"""``pdserve bench BENCHMARK ...``: one benchmark per module, imported only when chosen.

A benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Add one by
registering it in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib

from pdserve.cli_help import HelpFormatter

# benchmark -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "serving": ("pdserve.bench.serving", "online load test of a running server: TTFT, TPOT, ITL, goodput"),
    "transfer": ("pdserve.bench.transfer", "KV transfer throughput between prefill and decode"),
    "engine": ("pdserve.bench.engine_throughput", "offline engine throughput vs transformers"),
    "profile": ("pdserve.bench.profile", "time the real engine's steps; write a --simulate profile:FILE"),
    "pd-soak": ("pdserve.bench.pd_soak", "P/D pairs at high concurrency, random rank pairs, KV pressure, aborts: no room lost"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    listing = "\n".join(f"  {name:10s} {text}" for name, (_, text) in BENCHMARKS.items())
    parser.formatter_class = HelpFormatter
    parser.usage = "%(prog)s [-h] BENCHMARK [flags...]"
    parser.epilog = f"benchmarks:\n{listing}\n\n'pdserve bench BENCHMARK --help' shows a benchmark's flags."
    parser.add_argument("benchmark", choices=list(BENCHMARKS), metavar="BENCHMARK",
                        help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="flags", help=argparse.SUPPRESS)


def _load(name: str):
    """The benchmark's module, or None when it is not part of this installation."""
    module_name = BENCHMARKS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise


def run(args: argparse.Namespace) -> int:
    module = _load(args.benchmark)
    if module is None:
        print(f"pdserve bench {args.benchmark}: not available in this installation "
              f"(module {BENCHMARKS[args.benchmark][0]} is missing)")
        return 2
    parser = benchmark_parser(args.benchmark, module)
    return int(module.run(parser.parse_args(args.bench_args)) or 0)


def benchmark_parser(name: str, module=None) -> argparse.ArgumentParser:
    """The parser of ``pdserve bench NAME``."""
    module = module or importlib.import_module(BENCHMARKS[name][0])
    parser = argparse.ArgumentParser(prog=f"pdserve bench {name}", description=BENCHMARKS[name][1],
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser
