"""How every ``pdserve`` command prints ``--help``: each option's help ends with its default.

A help text that already names its default (it contains ``default``) is left as written; any
other gets `` (default: X)`` appended, ``none`` for an unset one. Descriptions and epilogs keep
their line breaks.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        default = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {default})"


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` states this option's default (for the test that walks every parser)."""
    return "default" in HelpFormatter("x")._get_help_string(action).lower()
