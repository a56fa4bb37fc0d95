"""Flag types of the benchmarks beyond those of ic_jax.cli: one context length, a list of batch sizes, a subset of
op names. As argparse types, their errors name their flag."""

from __future__ import annotations

import argparse

from ic_jax.cli import SIZE_HELP, parse_size, positive_int


def one_size(text: str) -> int:
    """A single size (parse_size): these benchmarks run at one context length."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmark runs at one context length; give one length, "
                                         f"like 200k ({SIZE_HELP})")
    return parse_size(text)


def positive_int_list(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1, like '1,64'."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more whole numbers like 1,64")
    return [positive_int(p) for p in parts]


def subset(choices: tuple[str, ...]):
    """A comma-separated, non-empty subset of `choices`, in the order given."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(choices)}")
        return names

    return parse
