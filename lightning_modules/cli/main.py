"""The `prd` console command.

    prd fit | validate | test | predict ...   LightningCLI (configs with class_path, see configs/)
    prd generate "a prompt" ... --out DIR      prompt -> mesh with a trained student
    prd eval ...                               CLIP score / retrieval of generated or given meshes
    prd demo [--config ...]                    the CPU demo of `make demo` (train, export, Chamfer before / after)

User errors (any `renderers.errors.UserError`: missing weights, bad input, unusable paths) end with a one-line
message and exit code 2.
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
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        args=argv,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        if argv[0] in EXTRA_COMMANDS:
            return _run_extra(argv[0], argv[1:])
        if argv[0] in LIGHTNING_STAGES:
            return _run_lightning(argv)
        raise UserError(
            f"unknown command {argv[0]!r}: use one of {', '.join(LIGHTNING_STAGES + tuple(EXTRA_COMMANDS))}"
        )
    except UserError as err:
        print(f"prd: error: {err}", file=sys.stderr)
        return 2
