"""Every flag of every ``pdserve`` command has help text that states its default, and every
subcommand's usage line names itself (walks the real parsers, so flags added later are caught)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pdserve.bench.cli import BENCHMARKS, benchmark_parser
from pdserve.cli import build_parser
from pdserve.cli_help import HelpFormatter, shows_default
from tests.server_harness import REPO_ROOT


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) for ``pdserve``, each subcommand and each benchmark."""
    todo = [("pdserve", build_parser("*"))]
    todo += [(f"pdserve bench {name}", benchmark_parser(name)) for name in BENCHMARKS]
    while todo:
        command, parser = todo.pop(0)
        yield command, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{command} {name}", sub) for name, sub in action.choices.items()]


ALL = list(parsers())


def test_walk_covers_every_command():
    commands = {command for command, _ in ALL}
    assert {"pdserve serve", "pdserve launch", "pdserve router", "pdserve generate", "pdserve bench",
            "pdserve bench engine", "pdserve bench serving", "pdserve bench transfer"} <= commands
    flags = {flag for _, p in ALL for a in p._actions for flag in a.option_strings}
    assert {"--simulate", "--max-n", "--honor-client-ranks", "--tool-call-parser"} <= flags


@pytest.mark.parametrize("command,parser", ALL, ids=[c for c, _ in ALL])
def test_every_option_has_help_and_default(command, parser):
    assert issubclass(parser.formatter_class, HelpFormatter), command
    assert parser.format_usage().startswith(f"usage: {command}"), parser.format_usage()
    missing, no_default = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:
            continue  # positionals: named in the usage line
        name = action.option_strings[-1]
        if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
            missing.append(name)
        elif not shows_default(action):
            no_default.append(name)
    assert not missing, f"{command}: flags without help: {missing}"
    assert not no_default, f"{command}: flags whose help hides the default: {no_default}"
    parser.format_help()  # every %-format in a help text renders


def test_help_output_shows_defaults_and_prog():
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "engine", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: pdserve bench engine") and "(default: 64)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "launch", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model-path" in out.stdout and "(default: 8000)" in out.stdout
