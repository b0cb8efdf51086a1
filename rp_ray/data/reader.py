"""Read raw rows from a JSON array or JSON Lines file, turning bad bytes into counted drops.

A whole-file problem (missing, empty, a JSON array that does not parse) is a
``DataFileError`` with the file, position and fix. A per-row problem in a JSON
Lines file (bad UTF-8, bad JSON, an oversized line) becomes a ``RawRow`` with a
drop reason, so it is counted in the data report instead of stopping the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


class DataFileError(ValueError):
    """A dataset file cannot be read at all; the message names the file and the fix."""


@dataclass(frozen=True)
class RawRow:
    """One row as read: its 0-based index, where it sits in the file, and either a value or a drop reason."""

    index: int
    where: str  # "line 12" for JSONL, "item 12" for a JSON array
    value: Any = None
    drop: str | None = None
    detail: str = ""
    size: int = 0  # bytes of the row's JSON text


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    head = head.removeprefix(BOM).lstrip()
    return head.startswith(b"[")


def _read_array(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    raw = path.read_bytes()
    data = raw.removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(
            f"{path}: not valid UTF-8 at byte offset {e.start + len(raw) - len(data)}; re-save the file as UTF-8 "
            f"(or as JSON Lines, where a bad row is dropped and counted instead of stopping the run)"
        ) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg} "
            f"(a JSON array file must parse as a whole; JSON Lines files drop bad rows instead)"
        ) from None
    if not isinstance(items, list):
        raise DataFileError(
            f"{path}: a .json dataset must be a JSON array of conversations, got {type(items).__name__}"
        )
    for i, item in enumerate(items):
        size = len(json.dumps(item, ensure_ascii=False).encode("utf-8"))
        if size > max_row_bytes:
            yield RawRow(
                i, f"item {i}", drop="too_long", detail=f"{size} bytes > max_row_bytes={max_row_bytes}", size=size
            )
        else:
            yield RawRow(i, f"item {i}", value=item, size=size)


def _read_lines(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    index = 0
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue  # blank lines are not rows
            where = f"line {line_no}"
            size = len(line)
            if size > max_row_bytes:
                yield RawRow(
                    index, where, drop="too_long", detail=f"{size} bytes > max_row_bytes={max_row_bytes}", size=size
                )
            else:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRow(
                        index, where, drop="invalid_utf8", detail=f"bad byte at column {e.start + 1}", size=size
                    )
                else:
                    try:
                        yield RawRow(index, where, value=json.loads(text), size=size)
                    except json.JSONDecodeError as e:
                        yield RawRow(index, where, drop="invalid_json", detail=f"column {e.colno}: {e.msg}", size=size)
            index += 1


def read_rows(path: str | Path, max_row_bytes: int = 1_048_576) -> Iterator[RawRow]:
    """Yield every row of a dataset file (JSON array, or JSON Lines for .jsonl or non-array .json)."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(
            f'{p} not found; put the file there or fix "file_name" in dataset_info.json '
            f"(the full ChatHaruhi splits: make full-data)"
        )
    if p.is_dir():
        raise DataFileError(f'{p} is a directory; "file_name" must name a .json or .jsonl file')
    empty = DataFileError(f"{p} is empty; it must hold a JSON array or JSON Lines of sharegpt conversations")
    if p.stat().st_size == 0:
        raise empty
    if p.suffix != ".jsonl" and _is_json_array(p):
        yield from _read_array(p, max_row_bytes)
        return
    n = 0
    for row in _read_lines(p, max_row_bytes):
        n += 1
        yield row
    if n == 0:
        raise empty
