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


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --compile, --compile-mode, --channels-last: how the networks run (`prd generate`, `prd serve`;
    `lightning_modules.student.inference`). Checked by `inference_options`."""
    from lightning_modules.student.inference import COMPILE_MODES, DTYPES

    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="precision of the UNet, VAE decoder and text encoder (sampler arithmetic and field stay "
                             "float32); float16 / bfloat16 are meant for CUDA; bfloat16 is also fast on CPUs with AMX "
                             "(Sapphire Rapids and later), slow on others")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and VAE decoder (warm-up timed apart; the CPU needs a C++ compiler)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                        help="with --compile: auto (reduce-overhead = CUDA graphs on CUDA, default elsewhere), default, "
                             "reduce-overhead, max-autotune (both CUDA only), max-autotune-no-cudagraphs")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory format for the UNet and VAE decoder convolutions")


def inference_options(args: argparse.Namespace, device) -> str | None:
    """The compile mode of `add_inference_arguments`' options (None: no --compile), after checking them for
    `device` (one-line `UserError`s: --compile-mode without --compile, a dtype or mode the device can't run)."""
    from lightning_modules.student.inference import check_inference_settings

    if args.compile_mode is not None and not args.compile:
        raise UserError("--compile-mode sets the mode of --compile: add --compile")
    compile_mode = (args.compile_mode or "auto") if args.compile else None
    check_inference_settings(device, args.dtype, compile_mode)
    return compile_mode
