"""``pdserve`` command line: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from pdserve import __version__
from pdserve.cli_help import HelpFormatter

# subcommand -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pdserve.engine.cli", "offline generation with the engine"),
    "serve": ("pdserve.server.cli", "run an HTTP server (mixed, prefill or decode mode)"),
    "router": ("pdserve.router.cli", "route requests to prefill/decode (or mixed) servers"),
    "launch": ("pdserve.router.launch", "start prefill and decode servers plus a router"),
    "bench": ("pdserve.bench.cli", "benchmarks: serving (online load), transfer (KV), engine (offline)"),
    "conformance": ("pdserve.conformance.cli", "check a P/D router against the DP-rank contract on a sim fleet"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """The ``pdserve`` parser with the flags of subcommand ``chosen`` (``"*"``: of every one)."""
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if chosen in (name, "*"):  # only the chosen subcommand's module is imported
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
