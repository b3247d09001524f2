"""Prompt libraries: DreamFusion-style JSON, plain text and JSONL, read lazily.

Formats (picked from the file extension unless a format is forced):

- ``.json``: the DreamFusion layout ``{"train": [...], "val": [...], "test": [...]}`` (a split is
  picked by the caller, or with ``file.json#split``), or a bare list of prompts. Entries are
  strings or objects holding ``json_field``. JSON is loaded into memory: use text or JSONL for
  libraries of millions of prompts.
- ``.jsonl`` / ``.ndjson``: one JSON object per line holding ``json_field`` (default ``"prompt"``),
  or a bare JSON string per line.
- anything else: plain text, one prompt per line (surrounding whitespace is stripped).

A file without a single valid prompt (empty, whitespace only, every line bad) is a one-line
:class:`PromptFileError`, as is a missing file or a folder (:class:`PromptSourceNotFoundError`); an inline
list may be empty (e.g. ``val_prompts: []``: no validation).

Text and JSONL files are never loaded: one streaming pass builds an int64 array of the byte
offsets of the valid lines (8 bytes per prompt), optionally cached next to the file as
``<file>.prompt-index.npz`` keyed by the file's size and mtime, and prompts are read on demand with
a seek. Bad lines (empty, invalid UTF-8, longer than ``max_chars`` characters, invalid JSON, a
missing or non-string field) are skipped and summarised in one logging warning with their
``file:line`` locations, or rejected with a one-line :class:`PromptFileError` when ``strict``.
The line checks and the offset index live in `datamodules/prompt_lines.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from datamodules.prompt_lines import (
    EMPTY,
    MISSING_FIELD,
    TOO_LONG,
    BadLineReport,
    PromptFileError,
    load_line_file,
)

BUNDLED_DIR = Path(__file__).resolve().parent / "prompt_sets"


class PromptSourceNotFoundError(PromptFileError, FileNotFoundError):
    """A prompt source that names no file (or a folder), one-line message."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""
PromptFormat = Literal["auto", "json", "jsonl", "text"]


class PromptSource(Protocol):
    """A read-only, indexable list of prompts."""

    name: str

    def __len__(self) -> int: ...

    def get(self, index: int) -> str:
        """The prompt at `index` (0-based among the valid prompts)."""
        ...


# ----------------------------------------------------------------------------------------------
# in-memory sources (JSON files and inline lists)


class InMemoryPrompts:
    """Prompts held as a Python list (JSON libraries, inline lists from a config)."""

    def __init__(self, prompts: Sequence[str], name: str):
        self.prompts = list(prompts)
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, index: int) -> str:
        return self.prompts[index]

    def __repr__(self) -> str:
        return f"InMemoryPrompts({self.name!r}, {len(self)} prompts)"


def _clean_entries(
    entries: Sequence[object], where: str, field_name: str, report: BadLineReport
) -> list[str]:
    """Validates JSON list entries (strings or objects with `field_name`); `where` names the list."""
    prompts = []
    for i, entry in enumerate(entries):
        location = f"{where}[{i}]"
        if isinstance(entry, dict):
            value = entry.get(field_name)
            if not isinstance(value, str):
                report.add(location, MISSING_FIELD, f"no string field {field_name!r}")
                continue
            entry = value
        if not isinstance(entry, str):
            report.add(location, MISSING_FIELD, f"expected a string, got {type(entry).__name__}")
            continue
        prompt = entry.strip()
        if not prompt:
            report.add(location, EMPTY)
        elif len(prompt) > report.max_chars:
            report.add(location, TOO_LONG, f"{len(prompt)} characters > max_prompt_chars={report.max_chars}")
        else:
            prompts.append(prompt)
    return prompts


def json_splits(path: Path, non_empty: bool = False) -> list[str] | None:
    """The split names of a DreamFusion-layout JSON file (`non_empty`: only those of non-empty lists), or None
    for a bare list."""
    data = _read_json(path)
    if not isinstance(data, dict):
        return None
    return [name for name, entries in data.items() if not non_empty or (isinstance(entries, list) and entries)]


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: invalid UTF-8 at byte {err.start}; save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def load_json_prompts(
    path: Path, split: str | None, *, field_name: str, max_chars: int, strict: bool
) -> InMemoryPrompts:
    """Loads one split of a DreamFusion-layout JSON file (or a bare JSON list)."""
    data = _read_json(path)
    report = BadLineReport(str(path), strict=strict, max_chars=max_chars)
    if isinstance(data, dict):
        if split is None or split not in data:
            raise PromptFileError(
                f"{path} has no {split!r} prompt list (it has: {', '.join(map(str, data)) or 'nothing'}); "
                "pick one with 'file.json#split'"
            )
        entries, where = data[split], f"{path}:{split}"
        name = f"{path}#{split}"
    else:
        entries, where, name = data, str(path), str(path)
    if not isinstance(entries, list):
        raise PromptFileError(f"{where} is not a list of prompts")
    prompts = _clean_entries(entries, where, field_name, report)
    if not prompts:
        report.name = where
        raise report.no_prompt_error()
    report.warn()
    return InMemoryPrompts(prompts, name)


def inline_prompts(
    prompts: Sequence[str], *, max_chars: int, strict: bool, name: str = "<inline>"
) -> InMemoryPrompts:
    report = BadLineReport(name, strict=strict, max_chars=max_chars)
    cleaned = _clean_entries(list(prompts), name, "prompt", report)
    report.warn()
    return InMemoryPrompts(cleaned, name)


# ----------------------------------------------------------------------------------------------
# resolving a source specification


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))


def resolve_path(spec: str) -> tuple[Path, str | None]:
    """`spec` -> (file, split or None). Accepts a path, ``path#split`` or a bundled set's name."""
    candidates = [(spec, None)]
    if "#" in spec:
        head, _, split = spec.rpartition("#")
        candidates.append((head, split))
    for name, split in candidates:
        path = Path(name).expanduser()
        if path.is_file():
            return path, split
        if path.is_dir():
            raise PromptSourceNotFoundError(
                f"prompt source {spec!r} is a folder, not a file: give a .json / .jsonl / .txt file"
            )
        if os.sep not in name and "/" not in name:
            for ext in ("", ".json", ".jsonl", ".txt"):
                bundled = BUNDLED_DIR / f"{name}{ext}"
                if bundled.is_file():
                    return bundled, split
    raise PromptSourceNotFoundError(
        f"prompt source {spec!r} not found: give a .json / .jsonl / .txt file path, 'file.json#split', "
        f"or a bundled set ({', '.join(bundled_names())})"
    )


def detect_format(path: Path, fmt: PromptFormat = "auto") -> Literal["json", "jsonl", "text"]:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "text"


def load_prompt_source(
    spec: str | Sequence[str],
    split: str | None = None,
    *,
    fmt: PromptFormat = "auto",
    json_field: str = "prompt",
    max_chars: int = 1000,
    strict: bool = False,
    cache_index: bool = True,
) -> PromptSource:
    """Opens a prompt library.

    Args:
        spec: a file path, ``"file.json#split"``, a bundled set's name (``"dreamfusion415"``) or an
            inline list of prompts.
        split: the list to take from a DreamFusion-layout JSON file when `spec` names none.
        fmt: ``"auto"`` (from the extension), ``"json"``, ``"jsonl"`` or ``"text"``.
        json_field: the prompt's key in JSON / JSONL objects.
        max_chars: longer prompts are bad lines.
        strict: raise on the first bad line instead of skipping it.
        cache_index: keep a text / JSONL file's offset index in ``<file>.prompt-index.npz``.
    """
    if not isinstance(spec, str):
        return inline_prompts(spec, max_chars=max_chars, strict=strict)
    path, named_split = resolve_path(spec)
    kind = detect_format(path, fmt)
    if kind == "json":
        return load_json_prompts(
            path, named_split or split, field_name=json_field, max_chars=max_chars, strict=strict
        )
    if named_split is not None:
        raise PromptFileError(f"{spec!r}: only JSON files have splits ('#{named_split}')")
    return load_line_file(
        path, kind, field_name=json_field, max_chars=max_chars, strict=strict, cache_index=cache_index
    )
