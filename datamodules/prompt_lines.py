"""Prompt lines: why a line is rejected (`BadLineReport`, `PromptFileError`) and the byte-offset index of text
and JSONL prompt files (`load_line_file` -> `LinePromptFile`), read one line at a time.

Text and JSONL files are never loaded: one streaming pass builds an int64 array of the byte offsets of the
valid lines (8 bytes per prompt), optionally cached next to the file as ``<file>.prompt-index.npz`` keyed by
the file's size and mtime, and prompts are read on demand with a seek. The prompt-library entry point is
`datamodules.prompt_sources.load_prompt_source`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from renderers.errors import UserError

log = logging.getLogger(__name__)

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

    def summary(self, where: str = "") -> str:
        """'3 bad prompt line(s)[ in <where>] (empty prompt: 2, invalid UTF-8: 1); first: p.txt:2 (empty prompt), ...'."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items()))
        more = ", ..." if self.count > len(self.examples) else ""
        where = f" in {where}" if where else ""
        return f"{self.count} bad prompt line(s){where} ({reasons}); first: {', '.join(self.examples)}{more}"

    def warn(self) -> None:
        if self.count:
            log.warning("skipped %s", self.summary(self.name))

    def no_prompt_error(self) -> PromptFileError:
        """The error for a source without a single valid prompt (what was skipped, if anything)."""
        skipped = ""
        if self.count:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items()))
            skipped = f"; its {self.count} line(s) are all bad ({reasons}; first: {self.examples[0]})"
        return PromptFileError(
            f"{self.name} holds no valid prompt{skipped}: write one prompt per line (UTF-8, at most "
            f"{self.max_chars} characters)"
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
        if not len(offsets):
            raise report.no_prompt_error()  # before caching: nothing is written next to an unusable file
        if cache_index:
            _write_index_cache(cache, key, offsets, report)
    if not len(offsets):
        raise report.no_prompt_error()
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
