"""The one error class for bad user input; `ic_jax.cli.entry` prints it as one line with exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a config, a size past what the model or the machine can take)."""
