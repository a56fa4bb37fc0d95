"""User-facing errors and the command-line plumbing that turns them into one line and exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays available through --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli_entry(main):
    """Wraps a `main(argv) -> int` so that UserError ends the process with one line and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
