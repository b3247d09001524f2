"""Checks of the paths given on the command line, made before any model loads, so that a bad path is one
line (`renderers.errors.UserError`, exit code 2) instead of a traceback after minutes of work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from renderers.errors import UserError


class OutputPathError(UserError, OSError):
    """An output folder that cannot be created or written to (one-line message)."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """`path` as a folder that exists and takes new files (created with its parents when missing).

    One-line `OutputPathError` when `path` is a file, a part of it is a file, or the folder cannot be
    created or written to (permissions, read-only file system).
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a file, not a folder: pass a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputPathError(
            f"{option} {str(path)!r}: a part of the path is a file, not a folder; pass a folder to write into"
        ) from None
    except OSError as err:
        raise OutputPathError(f"{option} {str(path)!r}: cannot create the folder ({err.strerror or err})") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputPathError(
            f"{option} {str(path)!r}: cannot write into the folder ({err.strerror or err}); pass a writable folder"
        ) from None
    return folder
