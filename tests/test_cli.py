import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "generate", "eval", "demo"):
        assert name in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "lightning_modules.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prd generate" in proc.stdout


def test_ckpt_path_last_is_resolved_as_lightning_does(tmp_path):
    """`prd fit --ckpt_path last` checks the file Lightning will load, found through public attributes only: the
    newest of each ModelCheckpoint's `last*.ckpt` and the OnExceptionCheckpoint file; a checkpoint folder left to
    Lightning is the logger's version folder; nothing there: None (a fresh start)."""
    import os

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.cli.fit import _resolve_ckpt_path
    from renderers.errors import UserError

    def trainer(*callbacks, logger=False):
        return Trainer(callbacks=list(callbacks), logger=logger, default_root_dir=tmp_path, enable_progress_bar=False,
                       enable_model_summary=False)

    def touch(path, when):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (when, when))
        return str(path)

    folder = tmp_path / "checkpoints"
    plain = trainer(ModelCheckpoint(dirpath=folder, save_last=True))
    assert _resolve_ckpt_path(plain, "last") is None
    touch(folder / "last.ckpt", 1_000)
    newest = touch(folder / "last-v1.ckpt", 2_000)
    touch(folder / "step=9.ckpt", 3_000)  # not a last checkpoint
    touch(folder / "last-v1.pt", 4_000)  # not the checkpoint extension
    assert _resolve_ckpt_path(plain, "last") == newest
    assert _resolve_ckpt_path(plain, str(folder / "last.ckpt")) == str(folder / "last.ckpt")  # a file: as given
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "crash")
    with_crash = trainer(ModelCheckpoint(dirpath=folder, save_last=True), on_exception)
    assert _resolve_ckpt_path(with_crash, "last") == newest
    crash = touch(Path(on_exception.ckpt_path), 5_000)
    assert _resolve_ckpt_path(with_crash, "last") == crash
    logged = trainer(ModelCheckpoint(save_last=True), logger=TensorBoardLogger(tmp_path / "logs", name="run", version=3))
    assert _resolve_ckpt_path(logged, "last") is None
    found = touch(tmp_path / "logs" / "run" / "version_3" / "checkpoints" / "last.ckpt", 1_000)
    assert _resolve_ckpt_path(logged, "last") == found
    for special in ("best", "hpc"):
        with pytest.raises(UserError, match=f"--ckpt_path {special}"):
            _resolve_ckpt_path(plain, special)
    hpc = touch(tmp_path / "hpc_ckpt_12.ckpt", 1_000)
    touch(tmp_path / "hpc_ckpt_3.ckpt", 2_000)
    assert _resolve_ckpt_path(plain, "hpc") == hpc
