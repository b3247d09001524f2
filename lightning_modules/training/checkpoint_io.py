"""Atomic checkpoint files: a checkpoint path always holds a complete checkpoint, the old one or the new one.

    trainer:
      plugins:
        - class_path: lightning_modules.training.checkpoint_io.AtomicCheckpointIO

Why Lightning's own writer is not enough. Lightning 2.6's `TorchCheckpointIO` (through
`lightning.fabric.utilities.cloud_io._atomic_save`) serialises the whole checkpoint into memory, then writes it
inside an fsspec transaction. For local paths fsspec 2026.9 puts the transaction's temporary file in the system
temp directory (`tempfile.mkstemp()`, not beside the checkpoint) and commits it with `shutil.move`. When /tmp and
the checkpoint directory are on different file systems (the usual cluster set-up: node-local /tmp, checkpoints on
NFS / Lustre / GPFS) `shutil.move` falls back to copying into the final path, so a job killed during the copy
(SIGKILL, out-of-memory killer, wall-time limit) leaves a truncated `last.ckpt` in place of the previous good one.
Nothing is fsync'ed, and a killed writer's temporary file stays in /tmp.

`AtomicCheckpointIO` streams `torch.save` straight into a temporary file in the checkpoint's own directory
(`.<name>.<random>.tmp`, which `--ckpt_path last` never picks up), fsyncs it, `os.replace`s it over the target
(atomic within one directory on POSIX file systems, NFS / Lustre / GPFS included) and fsyncs the directory.
Temporary files of the same target left by a killed writer are removed at its next save (Lightning writes each
checkpoint file from global rank 0 only, so there is one writer per file). Remote (fsspec URL) paths keep
Lightning's writer: object stores publish an upload only when it is complete.

`PRDModule` installs this writer in place of Lightning's default one (see `use_atomic_checkpoints`), so configs
that do not name it still get atomic checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


def _local_path(path: str | os.PathLike) -> Path | None:
    """The local file system path of `path` (plain or file://), None for remote URLs."""
    from fsspec.implementations.local import LocalFileSystem

    fs = get_filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        return None
    return Path(fs._strip_protocol(str(path)))


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """Leftover temporary files of an interrupted atomic write of `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems refuse to open directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path`: temporary file in the same
    directory, flush + fsync, `os.replace`, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in temporary_files(path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            log.info("removed %s, left by an interrupted checkpoint write", stale)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic, fsync'ed writes of local checkpoint files (see module doc)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's upload
            return
        atomic_torch_save(checkpoint, local)


def use_atomic_checkpoints(trainer) -> bool:
    """Replace the trainer's default `TorchCheckpointIO` by `AtomicCheckpointIO` (True when replaced).

    A writer the user configured (any other class, e.g. an async or remote one) is kept.
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or not hasattr(type(strategy), "checkpoint_io"):
        return False
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    log.debug("checkpoints are written atomically (AtomicCheckpointIO)")
    return True


__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "temporary_files", "use_atomic_checkpoints"]
