"""`prd fit | validate | test | predict`: LightningCLI (YAML configs with `class_path`), checked before any work.

`PRDCLI` is LightningCLI with three additions:

- before `fit` starts, every input is checked while nothing has loaded yet (`check_fit_inputs`): the output
  folders (`trainer.default_root_dir`, the loggers' `save_dir`, the checkpoint callbacks' `dirpath`) can be
  written, the prompt libraries open and fill a batch, the student's base (a local path) and `init_weights`
  exist, and `--ckpt_path` names a readable training checkpoint;
- a resumed `fit` (`--ckpt_path last` or a file, `check_resume`) refuses a config that contradicts the
  checkpoint's structural hyper-parameters (`checkpoints.STRUCTURAL_HPARAMS`: base, student_config, background,
  the renderers' names and classes, the optimizer / scheduler class) and takes every other hyper-parameter from
  the checkpoint, with a one-line notice for each one that differs from this run's config. (Lightning itself
  does this silently, and only when `--ckpt_path` is a file.)
- its argument errors keep jsonargparse's usage text and end with one line `prd: error: <reason>`
  (`PRDArgumentParser`).

Errors are `renderers.errors.UserError`s: `prd` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.cli.paths import writable_folder
from lightning_modules.training.checkpoints import CheckpointFileError, hparam_differences, read_checkpoint
from renderers.errors import UserError

_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
_JSONARGPARSE_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Problem with given class_path")


class ResumeConflictError(UserError, ValueError):
    """A resumed run whose config contradicts its checkpoint's structural hyper-parameters (one line)."""


class TrainerSettingsError(UserError, ValueError):
    """Trainer settings Lightning refuses (an accelerator that is not there, a bad precision, ...; one line)."""


def argument_error_reason(message: str, stage: str = "fit") -> str:
    """One line out of a (multi-line) jsonargparse error: the option and its innermost complaint."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    details = [
        line.removeprefix("- ")
        for line in lines
        if not line.startswith("Parser key") and not any(line.startswith(n) for n in _JSONARGPARSE_NOISE)
        and not line.startswith("- Expected a <class 'NoneType'>")
    ]
    detail = details[0] if details else (lines[0] if lines else "invalid arguments")
    detail = re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", detail)
    detail = re.sub(r"<class '([\w.]+)'>", r"\1", detail)
    option = ".".join(keys)
    text = f"{option}: {detail}" if option and not detail.startswith(option) else detail
    return f"{text} (see prd {stage} --help)"


class PRDArgumentParser(LightningArgumentParser):
    """jsonargparse's usage text and message, then one line `prd: error: <reason>` (exit code 2)."""

    def error(self, message: str, ex: Exception | None = None):
        try:
            super().error(message, ex)
        except SystemExit as exit_:
            if exit_.code == 2:
                words = (self.prog or "").split()
                stage = words[-1] if words and words[-1] in LightningCLI.subcommands() else "fit"
                sys.stderr.write(f"prd: error: {argument_error_reason(message, stage)}\n")
            raise


def _checkpoint_folder(trainer, callback) -> str:
    """Where a `ModelCheckpoint` writes: its `dirpath`, else (as Lightning resolves it at fit time) the first
    logger's `save_dir/name/version/checkpoints`, else `default_root_dir/checkpoints`."""
    if callback.dirpath is not None:
        return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def _last_checkpoint(trainer) -> str | None:
    """The file `--ckpt_path last` loads: the newest (by modification time) of the `OnExceptionCheckpoint` files and,
    in each `ModelCheckpoint`'s folder, the files named like its last checkpoint (`last.ckpt`, `last-v1.ckpt`, ...:
    `CHECKPOINT_NAME_LAST`, `FILE_EXTENSION`), as Lightning 2.6 chooses it; None when there is none."""
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    candidates = {callback.ckpt_path for callback in trainer.callbacks if isinstance(callback, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        folder = _checkpoint_folder(trainer, callback)
        fs = get_filesystem(folder)
        if fs.exists(folder):
            last = re.compile(rf"^{callback.CHECKPOINT_NAME_LAST}(-(\d+))?")
            candidates |= {
                os.path.normpath(path)
                for path in fs.ls(folder, detail=False)
                if Path(path).suffix == callback.FILE_EXTENSION and last.match(Path(path).stem)
            }
    modified = {}
    for path in filter(None, candidates):
        fs = get_filesystem(path)
        if fs.exists(path):
            modified[path] = fs.modified(path)
    return str(max(modified, key=modified.get)) if modified else None


def _hpc_checkpoint(trainer) -> str | None:
    """The file `--ckpt_path hpc` loads: `hpc_ckpt_<N>.ckpt` of the highest N in `default_root_dir` (as Lightning)."""
    folder = Path(trainer.default_root_dir)
    versions = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ()) if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return str(folder / f"hpc_ckpt_{max(versions)}.ckpt") if versions else None


def _resolve_ckpt_path(trainer, ckpt_path: str) -> str | None:
    """What Lightning will load for `ckpt_path` ("last", "best", "hpc" or a file), found with public attributes of
    the trainer and its callbacks; None: nothing (a first run with `--ckpt_path last`: Lightning warns and starts
    afresh)."""
    if ckpt_path == "last":
        return _last_checkpoint(trainer)
    if ckpt_path == "best":
        best = getattr(trainer.checkpoint_callback, "best_model_path", None)
        if not best:  # known only inside the run that wrote it
            raise CheckpointFileError(
                "--ckpt_path best: a new run does not know which checkpoint was best; pass that checkpoint's file"
            )
        return str(best)
    if ckpt_path == "hpc":
        found = _hpc_checkpoint(trainer)
        if found is None:
            raise CheckpointFileError(
                f"--ckpt_path hpc: no hpc_ckpt_<N>.ckpt in {trainer.default_root_dir}; pass a checkpoint file"
            )
        return found
    return ckpt_path


def check_fit_inputs(trainer, model, datamodule, default_root_dir: str | None, check_base: bool = True) -> None:
    """Everything `fit` reads or writes, checked before anything loads (one-line `UserError`s). `check_base=False`
    leaves out the student's base model (`prd demo` builds it itself)."""
    if default_root_dir is not None:
        writable_folder(default_root_dir, "--trainer.default_root_dir")
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            writable_folder(save_dir, f"trainer.logger ({type(logger).__name__}) save_dir")
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            writable_folder(dirpath, f"{type(callback).__name__} dirpath")
    if hasattr(model, "check_inputs"):
        model.check_inputs() if check_base else model.check_inputs(check_base=False)
    if datamodule is not None and hasattr(datamodule, "check_sources"):
        datamodule.check_sources("fit", int(trainer.world_size))


def _value(value: Any) -> str:
    if isinstance(value, str):  # the command line's text of a number reaches dict-typed arguments as a string
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        value = value if isinstance(parsed, str) else parsed
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class PRDCLI(LightningCLI):
    """LightningCLI for PRD: see the module docstring."""

    def __init__(self, args: list[str], run: bool = True) -> None:
        # Only the requested stage gets a parser (LightningCLI builds all four, a second of CPU per `prd fit`).
        self._stage = args[0] if run and args and args[0] in LightningCLI.subcommands() else None
        super().__init__(
            args=args,
            run=run,
            parser_class=PRDArgumentParser,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
        )

    def subcommands(self) -> dict[str, set[str]]:
        stages = LightningCLI.subcommands()
        return {self._stage: stages[self._stage]} if getattr(self, "_stage", None) else stages

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's own warns when `args` and sys.argv are both given, which is how `prd` passes them.
        self.config = parser.parse_args(args)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ImportError, ValueError) as err:
            if isinstance(err, UserError):
                raise
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise TrainerSettingsError(
                f"trainer: {first} (check --trainer.accelerator, --trainer.devices, --trainer.strategy and "
                "--trainer.precision)"
            ) from None

    def _parse_ckpt_path(self) -> None:
        # Lightning applies the checkpoint's hyper-parameters over the config here, silently, and only for a
        # file path. `fit` does it in before_fit instead (check_resume); the other stages keep Lightning's way,
        # after a one-line check of the file.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand == "fit" or not ckpt_path:
            return
        if ckpt_path not in _SPECIAL_CKPT_PATHS:
            read_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def check_inputs(self, check_base: bool = True) -> None:
        """`check_fit_inputs` of this CLI's trainer, model and data: `before_fit` runs it, and so does `prd demo`
        (`run=False`, its own base: `check_base=False`) before it builds or trains anything."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_fit_inputs(self.trainer, self.model, self.datamodule, config.trainer.get("default_root_dir"), check_base)

    def before_fit(self) -> None:
        self.check_inputs()
        ckpt_path = self.config.fit.get("ckpt_path")
        if ckpt_path:
            self.check_resume(ckpt_path)

    def check_resume(self, ckpt_path: str) -> None:
        """Refuse structural contradictions with the checkpoint; take the rest from it, one notice each."""
        resolved = _resolve_ckpt_path(self.trainer, ckpt_path)
        if resolved is None:
            return  # `--ckpt_path last` before the first checkpoint: a fresh start (Lightning warns)
        checkpoint = read_checkpoint(resolved)
        stored = checkpoint.get("hyper_parameters") or {}
        if not stored:
            return
        structural, other = hparam_differences(stored, dict(self.model.hparams))
        if structural:
            shown = "; ".join(f"model.{k}: {_value(was)} in the checkpoint, {_value(now)} now" for k, was, now in structural[:3])
            more = f" (and {len(structural) - 3} more)" if len(structural) > 3 else ""
            raise ResumeConflictError(
                f"--ckpt_path {ckpt_path} ({resolved}) was trained with another structure: {shown}{more}; resume "
                "with the checkpoint's values, or start a new run with another checkpoint folder"
            )
        if not other:
            return
        for key, was, now in other:
            rank_zero_info(f"resume: model.{key} = {_value(was)} from the checkpoint (this run's config: {_value(now)})")
        hparams = {k: v for k, v in stored.items() if k != "_instantiator"}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        self.config = self.parser.parse_object({"fit": {"model": hparams}}, self.config)
        self.__dict__.pop("config_dump", None)  # LightningCLI's cached dump: what the hyper-parameters record
        self._set_seed()  # the same global RNG state as the first instantiation
        self.instantiate_classes()


def run_lightning(argv: list[str]) -> int:
    """Run a Lightning stage; jsonargparse's exits (--help: 0, an argument error: 2) become the return code."""
    try:
        PRDCLI(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


__all__ = ["PRDArgumentParser", "PRDCLI", "ResumeConflictError", "argument_error_reason", "check_fit_inputs", "run_lightning"]
