"""The argument parser of `prd generate` and `prd eval`: every argument error (a bad type, a number out of its
range, an unknown option) is one `ArgumentsError` line, exit code 2, before anything loads.

    parser = CommandParser(prog="prd generate", ...)
    parser.add_argument("--resolution", type=int_at_least(4), default=160)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from renderers.errors import UserError


class ArgumentsError(UserError, ValueError):
    """A command-line argument that does not parse or is out of its range (one-line message)."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are one-line `ArgumentsError`s naming the command and its --help."""

    def error(self, message: str):
        raise ArgumentsError(f"{self.prog.removeprefix('prd ')}: {message} (see {self.prog} --help)")


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite number in the interval [low, high] (ends open when asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = "float"
    return parse
