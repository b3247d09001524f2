"""The `prd` console command.

    prd fit | validate | test | predict ...   LightningCLI (configs with class_path, see configs/)
    prd generate "a prompt" ... --out DIR      prompt -> mesh with a trained student
    prd eval ...                               CLIP score / retrieval of generated or given meshes
    prd demo [--config ...]                    the CPU demo of `make demo` (train, export, Chamfer before / after)
    prd serve [--weights ...] [--port 7860]    web page and HTTP API (POST /generate): prompt -> mesh

User errors (any `renderers.errors.UserError`: missing weights, bad input, unusable paths) end with a one-line
message and exit code 2; so do Lightning's configuration errors (`MisconfigurationException`, e.g. an
accelerator that is not there). Argument errors of `fit | validate | test | predict` keep jsonargparse's usage
text and end with the same one line. `prd` without a command prints this text and exits with code 2.
"""

from __future__ import annotations

import importlib
import sys

from renderers.errors import UserError

# Subcommands that are not Lightning stages: name -> "module:function(argv) -> int".
EXTRA_COMMANDS = {
    "generate": "lightning_modules.cli.generate:main",
    "eval": "lightning_modules.cli.evaluate:main",
    "demo": "lightning_modules.demo.cpu_demo:main",
    "serve": "lightning_modules.serve.command:main",
}
LIGHTNING_STAGES = ("fit", "validate", "test", "predict")


def _quiet_model_loading() -> None:
    """Per-file "Loading weights" bars of transformers / diffusers say nothing useful on the command line."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _run_extra(name: str, argv: list[str]) -> int:
    _quiet_model_loading()
    module_name, func_name = EXTRA_COMMANDS[name].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv) or 0)


def _run_lightning(argv: list[str]) -> int:
    from lightning_modules.cli.fit import run_lightning

    return run_lightning(argv)


def user_error_of(err: BaseException) -> BaseException | None:
    """The `UserError` behind `err`: itself, or one it was raised from (jsonargparse wraps the errors of the
    classes it instantiates in its own ValueErrors); a Lightning `MisconfigurationException` counts as one."""
    seen, queue = set(), [err]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError) or type(current).__name__ == "MisconfigurationException":
            return current
        queue += [current.__cause__, current.__context__]
    return None


def one_line(err: BaseException) -> str:
    """The first line of a user error's message (Lightning's configuration errors get a hint)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if type(err).__name__ == "MisconfigurationException":
        text += " (check --trainer.accelerator, --trainer.devices and --trainer.strategy)"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        print("prd: error: no command given: use one of " + ", ".join(LIGHTNING_STAGES + tuple(EXTRA_COMMANDS)), file=sys.stderr)
        return 2
    try:
        if argv[0] in EXTRA_COMMANDS:
            return _run_extra(argv[0], argv[1:])
        if argv[0] in LIGHTNING_STAGES:
            return _run_lightning(argv)
        raise UserError(
            f"unknown command {argv[0]!r}: use one of {', '.join(LIGHTNING_STAGES + tuple(EXTRA_COMMANDS))}"
        )
    except Exception as err:
        user_error = user_error_of(err)
        if user_error is None:
            raise
        print(f"prd: error: {one_line(user_error)}", file=sys.stderr)
        return 2
