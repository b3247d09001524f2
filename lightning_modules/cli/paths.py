"""Checks of the paths given on the command line, made before any model loads, so that a bad path is one
line (`renderers.errors.UserError`, exit code 2) instead of a traceback after minutes of work.

- `output_folder`: a folder to write into (created when missing).
- `writable_folder`: the same check without creating anything (folders Lightning creates itself).
- `input_file` / `input_folder`: something to read, of the right kind.
- `cannot_write`: the writability probe behind both output checks (one place to replace in tests).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from renderers.errors import UserError


class OutputPathError(UserError, OSError):
    """An output folder that cannot be created or written to (one-line message)."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class InputPathError(UserError, FileNotFoundError):
    """An input path that is missing, or a file where a folder is expected, or the other way round."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


def cannot_write(folder: Path) -> str | None:
    """Why nothing can be written into the existing folder `folder` (None: it can). Creates a nameless
    temporary file there and removes it at once."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


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
    reason = cannot_write(folder)
    if reason is not None:
        raise OutputPathError(f"{option} {str(path)!r}: cannot write into the folder ({reason}); pass a writable folder")
    return folder


def writable_folder(path: str | os.PathLike, option: str) -> Path:
    """Check, without creating anything, that `path` is a folder that takes new files or can be created:
    it is not a file, no part of it is a file, and it (or its nearest existing parent) is writable."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a file, not a folder: pass a folder to write into")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(
            f"{option} {str(path)!r}: a part of the path ({existing}) is a file, not a folder; pass a folder to write into"
        )
    reason = cannot_write(existing)
    if reason is not None:
        what = "write into the folder" if existing == folder else f"create the folder in {existing}"
        raise OutputPathError(f"{option} {str(path)!r}: cannot {what} ({reason}); pass a writable folder")
    return folder


def input_file(path: str | os.PathLike, option: str, what: str = "file") -> Path:
    """`path` as an existing, readable file (one-line `InputPathError` otherwise)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise InputPathError(f"{option} {str(path)!r} is a folder, not a {what}: pass the {what} itself")
    if not file.is_file():
        raise InputPathError(f"{option} {str(path)!r}: no such {what}")
    if not os.access(file, os.R_OK):
        raise InputPathError(f"{option} {str(path)!r}: the {what} cannot be read (permission denied)")
    return file


def input_folder(path: str | os.PathLike, option: str, what: str = "folder") -> Path:
    """`path` as an existing folder (one-line `InputPathError` otherwise)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputPathError(f"{option} {str(path)!r} is a file, not a {what}: pass a {what}")
    if not folder.is_dir():
        raise InputPathError(f"{option} {str(path)!r}: no such {what}")
    return folder
