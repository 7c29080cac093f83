"""Argument types the subcommands share: comma-separated lists and 'auto'-or-a-number."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def list_of(cast: type, what: str, example: str):
    """An argparse type for comma-separated values, e.g. ``--experts 4,8``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, e.g. {example}; got {text!r}") from None

    return parse


int_list = list_of(int, "integers", "4,8")
float_list = list_of(float, "numbers", "1,2,4")


def auto_or(convert: Callable[[str], float], expected: str, minimum: float | None = None
             ) -> Callable[[str], float | str]:
    """An argparse type taking 'auto' or a number that ``convert`` reads (at least ``minimum``)."""
    def parse(text: str) -> float | str:
        if text == "auto":
            return text
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (minimum is not None and not value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value
    return parse


experts = auto_or(int, "a number of experts or 'auto'")
alpha = auto_or(float, "'auto' or a number >= 0", minimum=0.0)


def positive_int(text: str) -> int:
    """An argparse type taking an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}")
    return value
