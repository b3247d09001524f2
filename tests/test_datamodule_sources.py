"""Prompt libraries: formats, bundled names, bad lines, lazy offset index at 1e6 lines."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import tracemalloc

import numpy as np
import pytest

from datamodules import prompt_lines
from datamodules.prompt_lines import (
    BadLineReport,
    LinePromptFile,
    PromptFileError,
    build_line_index,
    index_cache_path,
)
from datamodules.prompt_sources import BUNDLED_DIR, load_prompt_source

LOGGER = "datamodules"  # prompt_sources and prompt_lines


def all_prompts(source) -> list[str]:
    return [source.get(i) for i in range(len(source))]


# -- bundled DreamFusion set and name resolution ---------------------------------------------------


def test_bundled_name_resolves_to_dreamfusion_splits():
    bundled = json.loads((BUNDLED_DIR / "dreamfusion415.json").read_text())
    sizes = {split: len(load_prompt_source("dreamfusion415", split)) for split in ("train", "val", "test")}
    assert sizes == {split: len(bundled[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 415, "val": 16, "test": 415}
    val = load_prompt_source("dreamfusion415#val", "train")  # '#split' wins over the default split
    assert all_prompts(val) == bundled["val"]


def test_unknown_source_is_one_line_error_naming_bundled_sets():
    with pytest.raises(FileNotFoundError) as err:
        load_prompt_source("no_such_prompts")
    message = str(err.value)
    assert "\n" not in message and "no_such_prompts" in message and "dreamfusion415" in message


def test_json_missing_split_and_bad_entries(tmp_path, caplog):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"train": ["a cat", "", 7, {"prompt": "a dog"}, "x" * 1001], "val": ["v"]}))
    with pytest.raises(PromptFileError, match=r"no 'test' prompt list \(it has: train, val\)"):
        load_prompt_source(str(path), "test")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = load_prompt_source(str(path), "train")
    assert all_prompts(source) == ["a cat", "a dog"]
    text = caplog.text
    assert "skipped 3 bad prompt line(s)" in text
    for location in (f"{path}:train[1]", f"{path}:train[2]", f"{path}:train[4]"):
        assert location in text
    with pytest.raises(PromptFileError, match=rf"^{path}:train\[1\]: empty prompt"):
        load_prompt_source(str(path), "train", strict=True)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(["one", "two"]))
    assert all_prompts(load_prompt_source(str(bare), "val")) == ["one", "two"]


def test_inline_list_is_validated():
    assert all_prompts(load_prompt_source([" a red ball ", "a cube"])) == ["a red ball", "a cube"]
    with pytest.raises(PromptFileError, match=r"<inline>\[1\]: empty prompt"):
        load_prompt_source(["ok", "  "], strict=True)


# -- plain text --------------------------------------------------------------------------------


def test_text_file_reading(tmp_path):
    path = tmp_path / "p.txt"
    # BOM, CRLF, surrounding blanks, non-ASCII, no final newline.
    path.write_bytes("\ufeffa cat\r\n  a dog on a sofa \n un café au lait\na panda".encode())
    source = load_prompt_source(str(path))
    assert isinstance(source, LinePromptFile) and source.offsets.dtype == np.int64
    assert all_prompts(source) == ["a cat", "a dog on a sofa", "un café au lait", "a panda"]
    # Random access in any order.
    assert [source.get(i) for i in (3, 0, 2)] == ["a panda", "a cat", "un café au lait"]


BAD_TEXT_LINES = {  # line number -> (bytes, reason in the message)
    2: (b"", "empty prompt"),
    3: (b"   \t ", "empty prompt"),
    5: (b"bad \xff\xfe bytes", "invalid UTF-8"),
    6: (b"a" * 1001, "prompt too long (1001 characters > max_prompt_chars=1000)"),
    8: ("é".encode() * 1001, "prompt too long (1001 characters > max_prompt_chars=1000)"),
}


def write_text_with_bad_lines(path):
    lines = {1: b"first good", 4: b"second good", 7: "é".encode() * 1000, 9: b"last good"}
    lines.update({n: raw for n, (raw, _) in BAD_TEXT_LINES.items()})
    path.write_bytes(b"\n".join(lines[n] for n in sorted(lines)) + b"\n")
    return ["first good", "second good", "é" * 1000, "last good"]


def test_text_bad_lines_are_skipped_and_reported(tmp_path, caplog):
    path = tmp_path / "p.txt"
    good = write_text_with_bad_lines(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = load_prompt_source(str(path), cache_index=False)
    assert all_prompts(source) == good  # 1000 two-byte characters are within the limit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    summary = warnings[0]
    assert "skipped 5 bad prompt line(s)" in summary
    assert "empty prompt: 2" in summary and "invalid UTF-8: 1" in summary and "prompt too long: 2" in summary
    for line_no in BAD_TEXT_LINES:
        assert f"{path}:{line_no} (" in summary


@pytest.mark.parametrize("line_no", sorted(BAD_TEXT_LINES))
def test_text_bad_line_rejected_when_strict(tmp_path, line_no):
    path = tmp_path / "p.txt"
    raw, reason = BAD_TEXT_LINES[line_no]
    path.write_bytes(b"good one\n" * (line_no - 1) + raw + b"\nanother good\n")
    with pytest.raises(PromptFileError) as err:
        load_prompt_source(str(path), strict=True, cache_index=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_no}: {reason}") and "strict=False" in message


def test_max_prompt_chars_is_configurable(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("short\n" + "y" * 30 + "\n")
    assert all_prompts(load_prompt_source(str(path), max_chars=20, cache_index=False)) == ["short"]
    assert len(load_prompt_source(str(path), max_chars=30, cache_index=False)) == 2


def test_giant_line_is_skipped_without_holding_it(tmp_path, caplog):
    path = tmp_path / "p.txt"
    with open(path, "wb") as fh:
        fh.write(b"before\n" + b"z" * (3 << 20) + b"\nafter\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = load_prompt_source(str(path), cache_index=False)
    assert all_prompts(source) == ["before", "after"]
    assert f"{path}:2 (prompt too long" in caplog.text


# -- JSONL -------------------------------------------------------------------------------------

BAD_JSONL_LINES = {
    2: (b"", "empty prompt"),
    3: (b'{"prompt": "broken', "invalid JSON"),
    4: (b'{"caption": "no prompt key"}', "missing prompt field (no string field 'prompt')"),
    5: (b'{"prompt": 12}', "missing prompt field (no string field 'prompt')"),
    6: (b'{"prompt": "caf\xe9"}', "invalid UTF-8"),
    7: (json.dumps({"prompt": "w" * 1001}).encode(), "prompt too long (1001 characters"),
    8: (b"[1, 2]", "missing prompt field"),
    9: (b'{"prompt": "   "}', "empty prompt"),
}


def test_jsonl_objects_strings_and_bad_lines(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    lines = {
        1: b'{"prompt": "a red car", "id": 1}',
        10: b'"a bare string prompt"',
        11: '{"prompt": "ünïcode"}'.encode(),
    }
    lines.update({n: raw for n, (raw, _) in BAD_JSONL_LINES.items()})
    path.write_bytes(b"\n".join(lines[n] for n in sorted(lines)) + b"\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = load_prompt_source(str(path), cache_index=False)
    assert all_prompts(source) == ["a red car", "a bare string prompt", "ünïcode"]
    assert f"skipped {len(BAD_JSONL_LINES)} bad prompt line(s)" in caplog.text
    for line_no in list(BAD_JSONL_LINES)[:5]:  # the summary quotes the first five
        assert f"{path}:{line_no} (" in caplog.text


@pytest.mark.parametrize("line_no", sorted(BAD_JSONL_LINES))
def test_jsonl_bad_line_rejected_when_strict(tmp_path, line_no):
    path = tmp_path / "p.jsonl"
    raw, reason = BAD_JSONL_LINES[line_no]
    path.write_bytes(b'{"prompt": "fine"}\n' + raw + b"\n")
    with pytest.raises(PromptFileError) as err:
        load_prompt_source(str(path), strict=True, cache_index=False)
    assert str(err.value).startswith(f"{path}:2: {reason}") and "\n" not in str(err.value)


def test_format_can_be_forced(tmp_path):
    path = tmp_path / "captions.data"
    path.write_text('{"prompt": "a kettle"}\n')
    assert all_prompts(load_prompt_source(str(path), cache_index=False)) == ['{"prompt": "a kettle"}']
    assert all_prompts(load_prompt_source(str(path), fmt="jsonl", cache_index=False)) == ["a kettle"]
    with pytest.raises(PromptFileError, match="only JSON files have splits"):
        load_prompt_source(f"{path}#val", fmt="jsonl")


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"caption": "a teapot"}\n{"caption": "a lamp", "prompt": "ignored"}\n')
    source = load_prompt_source(str(path), json_field="caption", cache_index=False)
    assert all_prompts(source) == ["a teapot", "a lamp"]


# -- scale: a million lines ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def million_lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("million") / "million.txt"
    with open(path, "w") as fh:
        fh.write("".join(f"a small object number {i} on a table\n" for i in range(1_000_000)))
    return path


def test_million_line_index_is_fast_small_and_lazy(million_lines):
    size = million_lines.stat().st_size
    tracemalloc.start()
    offsets = build_line_index(
        million_lines, "text", field_name="prompt", max_chars=1000, report=BadLineReport("m")
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert offsets.shape == (1_000_000,) and offsets.dtype == np.int64
    # Memory: the offsets (8 bytes per line, grown in place) plus one block of the file, never the file.
    assert peak < 1.2 * offsets.nbytes + (4 << 20), f"peak {peak / 1e6:.1f} MB"
    assert peak < size / 2
    source = LinePromptFile(million_lines, "text", offsets, "prompt")
    # Nothing per prompt is held but the offsets: a pickle (what workers receive) is that size.
    assert len(pickle.dumps(source)) < offsets.nbytes + 4096
    for i in (0, 1, 123_456, 999_999):
        assert source.get(i) == f"a small object number {i} on a table"


def test_index_cache_reused_and_invalidated(million_lines, tmp_path, caplog, monkeypatch):
    path = tmp_path / "p.txt"
    write_text_with_bad_lines(path)
    cache = index_cache_path(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = load_prompt_source(str(path))
    assert cache.is_file()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second = load_prompt_source(str(path))
    np.testing.assert_array_equal(first.offsets, second.offsets)
    assert "skipped 5 bad prompt line(s)" in caplog.text  # the cached report is shown again
    with pytest.raises(PromptFileError, match=rf"^{path}:2: empty prompt"):
        load_prompt_source(str(path), strict=True)  # strict also applies to a cached index
    # Changing the file (size / mtime) invalidates the cache.
    with open(path, "ab") as fh:
        fh.write(b"appended prompt\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_prompt_source(str(path))
    assert len(third) == len(first) + 1 and third.get(len(third) - 1) == "appended prompt"
    # A cached load of the million-line file does not index it again.
    load_prompt_source(str(million_lines))
    assert index_cache_path(million_lines).is_file()

    def no_indexing(*args, **kwargs):
        raise AssertionError("the file was indexed again although its cache is valid")

    monkeypatch.setattr(prompt_lines, "build_line_index", no_indexing)
    cached = load_prompt_source(str(million_lines))
    assert len(cached) == 1_000_000 and cached.get(999_999) == "a small object number 999999 on a table"


def test_jsonl_index_at_scale(tmp_path):
    path = tmp_path / "p.jsonl"
    n = 200_000
    path.write_text("".join(json.dumps({"prompt": f"thing {i}"}) + "\n" for i in range(n)))
    source = load_prompt_source(str(path), cache_index=False)
    assert len(source) == n and source.get(n - 1) == f"thing {n - 1}" and source.get(7) == "thing 7"
    # nothing per prompt is kept but its byte offset (speed is a benchmark's business, not a test's)
    assert source.offsets.dtype == np.int64 and source.offsets.shape == (n,)
    assert len(pickle.dumps(source)) < source.offsets.nbytes + 4096
