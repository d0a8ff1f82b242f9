"""What the ahfa-eval commands share about their command line: the usage error, the help format, the
list-valued option types and the default output folder.

A helper that finds bad input raises UsageError and stays reusable from Python; only cli.main turns
the error into a one-line message and exit status 2, as argparse does for its own errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("eval/results")


class UsageError(Exception):
    """Input the user can fix (an option, a file, a model); the message is one line that names it."""


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. ``1024,2048``."""
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    """A comma-separated list of numbers, e.g. ``0.9,0.95``."""
    return [float(x) for x in text.split(",") if x]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (it holds examples) and each option's default after its help.

    Unlike argparse.ArgumentDefaultsHelpFormatter, it leaves out defaults that say nothing (None, off
    flags) and writes a list default the way the option takes it (comma- or space-separated).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if any(default is x for x in (None, False, argparse.SUPPRESS)) or "default" in text or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            default = (" " if action.nargs in ("+", "*") else ",").join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def add_command(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help format: ``summary`` in the command list, ``description``
    (plain text) in its own ``--help``."""
    return subparsers.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
