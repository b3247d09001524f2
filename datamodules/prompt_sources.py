"""Prompt libraries: DreamFusion-style JSON, plain text and JSONL, read lazily.

Formats (picked from the file extension unless a format is forced):

- ``.json``: the DreamFusion layout ``{"train": [...], "val": [...], "test": [...]}`` (a split is
  picked by the caller, or with ``file.json#split``), or a bare list of prompts. Entries are
  strings or objects holding ``json_field``. JSON is loaded into memory: use text or JSONL for
  libraries of millions of prompts.
- ``.jsonl`` / ``.ndjson``: one JSON object per line holding ``json_field`` (default ``"prompt"``),
  or a bare JSON string per line.
- anything else: plain text, one prompt per line (surrounding whitespace is stripped).

Text and JSONL files are never loaded: one streaming pass builds an int64 array of the byte
offsets of the valid lines (8 bytes per prompt), optionally cached next to the file as
``<file>.prompt-index.npz`` keyed by the file's size and mtime, and prompts are read on demand with
a seek. Bad lines (empty, invalid UTF-8, longer than ``max_chars`` characters, invalid JSON, a
missing or non-string field) are skipped and summarised in one logging warning with their
``file:line`` locations, or rejected with a one-line :class:`PromptFileError` when ``strict``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from renderers.errors import UserError

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "prompt_sets"
PromptFormat = Literal["auto", "json", "jsonl", "text"]

INDEX_VERSION = 1
BLOCK_BYTES = 1 << 18  # bytes read per step of the indexing pass
SHOWN_BAD_LINES = 5  # file:line locations quoted in the warning summary
_WHITESPACE = (9, 10, 11, 12, 13, 32)  # the ASCII bytes str.strip() removes

# Reasons a line is rejected; code 0 means "valid".
EMPTY, INVALID_UTF8, TOO_LONG, INVALID_JSON, MISSING_FIELD = 1, 2, 3, 4, 5
_REASON_TEXT = {
    EMPTY: "empty prompt",
    INVALID_UTF8: "invalid UTF-8",
    TOO_LONG: "prompt too long",
    INVALID_JSON: "invalid JSON",
    MISSING_FIELD: "missing prompt field",
}


class PromptFileError(UserError, ValueError):
    """A prompt library that cannot be used as given (one-line message)."""


class PromptSource(Protocol):
    """A read-only, indexable list of prompts."""

    name: str

    def __len__(self) -> int: ...

    def get(self, index: int) -> str:
        """The prompt at `index` (0-based among the valid prompts)."""
        ...


# ----------------------------------------------------------------------------------------------
# bad-line bookkeeping


@dataclass
class BadLineReport:
    """Counts rejected lines of one source and keeps the first few locations for the warning."""

    name: str
    strict: bool = False
    max_chars: int = 1000
    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def describe(self, reason: int, detail: str = "") -> str:
        text = _REASON_TEXT[reason]
        if reason == TOO_LONG and not detail:
            detail = f"over max_prompt_chars={self.max_chars}"
        return f"{text} ({detail})" if detail else text

    def add(self, location: str, reason: int, detail: str = "") -> None:
        description = self.describe(reason, detail)
        if self.strict:
            raise PromptFileError(
                f"{location}: {description}; fix or remove that line, or set strict=False to skip bad lines"
            )
        self.count += 1
        self.by_reason[_REASON_TEXT[reason]] += 1
        if len(self.examples) < SHOWN_BAD_LINES:
            self.examples.append(f"{location} ({description})")

    def warn(self) -> None:
        if not self.count:
            return
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items()))
        more = ", ..." if self.count > len(self.examples) else ""
        log.warning(
            "skipped %d bad prompt line(s) in %s (%s); first: %s%s",
            self.count,
            self.name,
            reasons,
            ", ".join(self.examples),
            more,
        )

    def to_json(self) -> str:
        return json.dumps({"count": self.count, "by_reason": dict(self.by_reason), "examples": self.examples})

    def restore(self, text: str) -> None:
        """Re-applies a report saved in an index cache (raises at once when strict)."""
        saved = json.loads(text)
        if saved["count"] and self.strict:
            raise PromptFileError(
                f"{saved['examples'][0]}; fix or remove that line, or set strict=False to skip bad lines"
            )
        self.count = saved["count"]
        self.by_reason = Counter(saved["by_reason"])
        self.examples = list(saved["examples"])


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


def json_splits(path: Path) -> list[str] | None:
    """The split names of a DreamFusion-layout JSON file, or None for a bare list."""
    data = _read_json(path)
    return list(data) if isinstance(data, dict) else None


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
# line files (text and JSONL), indexed by byte offset


def _line_blocks(fh, overlong_bytes: int) -> Iterator[tuple[str, int, bytes]]:
    """Streams a binary file as blocks of whole lines.

    Yields ``("lines", base, data)`` where `data` (starting at byte `base`) holds complete lines,
    each ending in ``\\n`` except possibly the last line of the file, and ``("overlong", base, b"")``
    for a single line longer than `overlong_bytes`, which is skipped without being held in memory.
    """
    base = 0
    head = fh.read(3)
    if head == b"\xef\xbb\xbf":  # UTF-8 byte-order mark: not part of the first prompt
        base, carry = 3, b""
    else:
        carry = head
    while True:
        chunk = fh.read(BLOCK_BYTES)
        if not chunk:
            if carry:
                yield "lines", base, carry
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) <= overlong_bytes:
                carry = data
                continue
            # A giant line: skip to its end without keeping it.
            start, skipped = base, len(data)
            while True:
                chunk = fh.read(BLOCK_BYTES)
                newline = chunk.find(b"\n")
                if not chunk or newline >= 0:
                    break
                skipped += len(chunk)
            yield "overlong", start, b""
            if not chunk:
                return
            base = start + skipped + newline + 1
            carry = chunk[newline + 1 :]
            continue
        yield "lines", base, data[:cut]
        base += cut
        carry = data[cut:]


def _line_bounds(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, without the newline) byte positions of the lines in a block."""
    newlines = np.flatnonzero(arr == 10)
    if len(arr) and arr[-1] != 10:
        ends = np.append(newlines, len(arr))
    else:
        ends = newlines
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    return starts, ends


def _prefix_counts(mask: np.ndarray) -> np.ndarray:
    """`out[j] - out[i]` = number of True entries of mask[i:j]."""
    out = np.zeros(len(mask) + 1, dtype=np.int32)
    np.cumsum(mask, dtype=np.int32, out=out[1:])
    return out


def _check_text_line(raw: bytes, max_chars: int) -> tuple[int, str]:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        return INVALID_UTF8, f"byte {err.start}"
    if not text:
        return EMPTY, ""
    if len(text) > max_chars:
        return TOO_LONG, f"{len(text)} characters > max_prompt_chars={max_chars}"
    return 0, ""


def _scan_text_block(data: bytes, max_chars: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Line starts, reason codes and details of one block of a plain-text file.

    Short pure-ASCII lines (the vast majority) are checked with array operations; lines with
    non-ASCII bytes or more than `max_chars` bytes are decoded one by one.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    starts, ends = _line_bounds(arr)
    non_space = _prefix_counts(~np.isin(arr, _WHITESPACE))
    high = _prefix_counts(arr >= 0x80)
    reasons = np.where(non_space[ends] - non_space[starts] == 0, EMPTY, 0).astype(np.int8)
    details: dict[int, str] = {}
    exact = np.flatnonzero((high[ends] - high[starts] > 0) | (ends - starts > max_chars))
    for i in exact:
        reasons[i], detail = _check_text_line(data[starts[i] : ends[i]], max_chars)
        if detail:
            details[int(i)] = detail
    return starts, reasons, details


def _jsonl_prompt(line: str, field_name: str, max_chars: int) -> tuple[int, str, str]:
    """(reason, detail, prompt) for one decoded JSONL line."""
    line = line.strip()
    if not line:
        return EMPTY, "", ""
    try:
        value = json.loads(line)
    except ValueError as err:
        return INVALID_JSON, str(err).split(":")[0], ""
    if isinstance(value, dict):
        value = value.get(field_name)
        if not isinstance(value, str):
            return MISSING_FIELD, f"no string field {field_name!r}", ""
    elif not isinstance(value, str):
        return MISSING_FIELD, f"expected an object with {field_name!r} or a string", ""
    prompt = value.strip()
    if not prompt:
        return EMPTY, "", ""
    if len(prompt) > max_chars:
        return TOO_LONG, f"{len(prompt)} characters > max_prompt_chars={max_chars}", ""
    return 0, "", prompt


def _scan_jsonl_block(
    data: bytes, max_chars: int, field_name: str
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    arr = np.frombuffer(data, dtype=np.uint8)
    starts, ends = _line_bounds(arr)
    reasons = np.zeros(len(starts), dtype=np.int8)
    details: dict[int, str] = {}
    try:
        lines = data.decode("utf-8").split("\n")[: len(starts)]
    except UnicodeDecodeError:
        lines = None
    for i in range(len(starts)):
        if lines is not None:
            line = lines[i]
        else:
            try:
                line = data[starts[i] : ends[i]].decode("utf-8")
            except UnicodeDecodeError as err:
                reasons[i], details[i] = INVALID_UTF8, f"byte {err.start}"
                continue
        reason, detail, _ = _jsonl_prompt(line, field_name, max_chars)
        if reason:
            reasons[i] = reason
            if detail:
                details[i] = detail
    return starts, reasons, details


def build_line_index(
    path: Path, fmt: Literal["text", "jsonl"], *, field_name: str, max_chars: int, report: BadLineReport
) -> np.ndarray:
    """One streaming pass over a text / JSONL file: int64 byte offsets of its valid lines.

    Memory: the offsets plus one block of the file; nothing is kept per bad line beyond the
    report's counters and first few locations.
    """
    offsets = _GrowingArray()
    line_no = 0  # lines seen before the current block
    overlong_bytes = max(4 * BLOCK_BYTES, 4 * max_chars + 16)
    with open(path, "rb") as fh:
        for kind, base, data in _line_blocks(fh, overlong_bytes):
            if kind == "overlong":
                line_no += 1
                report.add(f"{path}:{line_no}", TOO_LONG, f"over {overlong_bytes} bytes")
                continue
            if fmt == "text":
                starts, reasons, details = _scan_text_block(data, max_chars)
            else:
                starts, reasons, details = _scan_jsonl_block(data, max_chars, field_name)
            for i in np.flatnonzero(reasons):
                report.add(f"{path}:{line_no + i + 1}", int(reasons[i]), details.get(int(i), ""))
            offsets.extend(starts[reasons == 0], base)
            line_no += len(starts)
    return offsets.finish()


class _GrowingArray:
    """An int64 array grown in place (realloc), so building it never holds two copies."""

    def __init__(self, capacity: int = 1 << 16):
        self.data = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def extend(self, values: np.ndarray, shift: int) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            self.data.resize(max(end, 2 * len(self.data)), refcheck=False)
        np.add(values, shift, out=self.data[self.size : end])
        self.size = end

    def finish(self) -> np.ndarray:
        self.data.resize(self.size, refcheck=False)
        return self.data


class LinePromptFile:
    """A text or JSONL prompt file, read one line at a time through a byte-offset index.

    `offsets` ([N] int64) holds the byte position of each valid line; it is the only per-prompt
    memory. The file handle is opened lazily in each process (DataLoader workers included).
    """

    def __init__(self, path: Path, fmt: Literal["text", "jsonl"], offsets: np.ndarray, field_name: str):
        self.path = Path(path)
        self.fmt = fmt
        self.offsets = offsets
        self.field_name = field_name
        self.name = str(path)
        self._fh = None
        self._fh_pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_fh_pid"] = None, -1
        return state

    def _handle(self):
        # A handle inherited through fork shares its file position with the parent: reopen.
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open for lazy reads)
            self._fh_pid = os.getpid()
        return self._fh

    def get(self, index: int) -> str:
        fh = self._handle()
        fh.seek(int(self.offsets[index]))
        line = fh.readline().decode("utf-8")
        if self.fmt == "text":
            return line.strip()
        value = json.loads(line)
        return (value[self.field_name] if isinstance(value, dict) else value).strip()

    def close(self) -> None:
        if self._fh is not None and self._fh_pid == os.getpid():
            self._fh.close()
        self._fh = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LinePromptFile({self.name!r}, {self.fmt}, {len(self)} prompts)"


def index_cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".prompt-index.npz")


def _index_key(path: Path, fmt: str, field_name: str, max_chars: int) -> str:
    stat = path.stat()
    return json.dumps(
        {
            "version": INDEX_VERSION,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "format": fmt,
            "field": field_name if fmt == "jsonl" else None,
            "max_chars": max_chars,
        },
        sort_keys=True,
    )


def load_line_file(
    path: Path,
    fmt: Literal["text", "jsonl"],
    *,
    field_name: str,
    max_chars: int,
    strict: bool,
    cache_index: bool,
) -> LinePromptFile:
    """Indexes a text / JSONL prompt file, reusing ``<file>.prompt-index.npz`` when it is current."""
    report = BadLineReport(str(path), strict=strict, max_chars=max_chars)
    key = _index_key(path, fmt, field_name, max_chars)
    cache = index_cache_path(path)
    offsets = None
    if cache_index and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                if str(saved["key"]) == key:
                    report.restore(str(saved["report"]))
                    offsets = saved["offsets"]
        except (OSError, ValueError, KeyError) as err:
            log.info("ignoring unreadable prompt index cache %s (%s)", cache, err)
    if offsets is None:
        offsets = build_line_index(path, fmt, field_name=field_name, max_chars=max_chars, report=report)
        if cache_index:
            _write_index_cache(cache, key, offsets, report)
    report.warn()
    return LinePromptFile(path, fmt, offsets, field_name)


def _write_index_cache(cache: Path, key: str, offsets: np.ndarray, report: BadLineReport) -> None:
    # Written to a temporary name then renamed, so concurrent ranks never read a partial file.
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, key=np.array(key), offsets=offsets, report=np.array(report.to_json()))
        os.replace(tmp, cache)
    except OSError as err:
        log.info("could not cache the prompt index at %s (%s); it will be rebuilt next time", cache, err)
        tmp.unlink(missing_ok=True)


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
        if os.sep not in name and "/" not in name:
            for ext in ("", ".json", ".jsonl", ".txt"):
                bundled = BUNDLED_DIR / f"{name}{ext}"
                if bundled.is_file():
                    return bundled, split
    raise FileNotFoundError(
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
