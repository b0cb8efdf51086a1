"""Read raw rows from a JSON array or JSON Lines file, plain or xz-compressed, turning bad bytes into counted drops.

A whole-file problem (missing, empty, a JSON array that does not parse, a damaged .xz) is a ``DataFileError``
with the file, position and fix. A per-row problem in a JSON Lines file (bad UTF-8, bad JSON, an oversized line), and
in either layout a row of valid JSON that Python's parser cannot hold (nested too deeply, an integer of thousands of
digits), becomes a ``RawRow`` with a drop reason, so it is counted in the data report instead of stopping the run.

Memory stays bounded whatever the file holds: both layouts are read as a stream (a JSON array item by item, JSON
Lines line by line), and a row is never held beyond ``max_row_bytes`` of its text: past that it is skipped to its
end and dropped as ``too_long``. The limit applies to the decompressed text of a ``.json.xz`` / ``.jsonl.xz``
file, so a decompression bomb costs reading time, never memory.
"""

from __future__ import annotations

import codecs
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BOM = b"\xef\xbb\xbf"
CHUNK = 1 << 20  # bytes read (and decompressed) at a time
COMPRESSED = {".xz": lzma.open}  # suffix -> opener of the decompressed byte stream
_NOT_WS = re.compile(r"[^ \t\n\r]")
_STRUCTURE = re.compile(r'[\[\]{}"]')  # outside a string: what changes the nesting
_IN_STRING = re.compile(r'["\\]')  # inside a string: its end, or an escape
_SCALAR_END = re.compile(r"[,\] \t\n\r]")
_DECODER = json.JSONDecoder()
_FOLLOWERS = frozenset(" \t\n\r,]")  # what may follow an item: a number cut by the end of a chunk is not done


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
    size: int = 0  # bytes of the row's JSON text as it is in the (decompressed) file


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends with a known compression suffix."""
    opener = COMPRESSED.get(path.suffix)
    return opener(path, "rb") if opener else path.open("rb")


def data_suffix(path: Path) -> str:
    """``.json`` / ``.jsonl`` of a data file, looking through a compression suffix (``x.jsonl.xz`` -> ``.jsonl``)."""
    return path.with_suffix("").suffix if path.suffix in COMPRESSED else path.suffix


def _is_json_array(path: Path) -> bool:
    with _open(path) as f:
        return f.read(4096).removeprefix(BOM).lstrip().startswith(b"[")


def _too_long(size: int, max_row_bytes: int) -> str:
    return f"{size} bytes > max_row_bytes={max_row_bytes}"


# What json raises for valid JSON that Python cannot hold: RecursionError for nesting deeper than the interpreter's
# recursion limit, ValueError for an integer of more digits than int() converts (4300 by default). JSONDecodeError
# is a ValueError too: catch it first.
UNPARSABLE = (RecursionError, ValueError)


def _unparsable(e: Exception) -> str:
    """The drop detail of an ``UNPARSABLE`` error."""
    if isinstance(e, RecursionError):
        return "nested too deeply for Python's JSON parser"
    return f"{str(e).split(';')[0]} (write such a number as a string)"


class _ArrayText:
    """The UTF-8 text of a JSON array file, decoded chunk by chunk, holding only what the current item needs.

    ``buf`` is the text from the first character not yet consumed; ``line`` / ``col`` are the position of
    ``buf[0]`` in the file (1-based, characters, as ``json`` reports them), so errors name the true position.
    """

    def __init__(self, f: IO[bytes], path: Path):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf, self.pos = "", 0
        self.line, self.col = 1, 1
        self.fed = 0  # bytes of the file read so far (the BOM included), for UTF-8 error offsets
        self.eof = False
        first = f.read(len(BOM))
        if first == BOM:
            self.fed = len(BOM)
        else:
            self._feed(first)

    def _feed(self, data: bytes) -> None:
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataFileError(
                f"{self.path}: not valid UTF-8 at byte offset {self.fed - pending + e.start}; re-save the file as "
                f"UTF-8 (or as JSON Lines, where a bad row is dropped and counted instead of stopping the run)"
            ) from None
        self.fed += len(data)
        self.buf += text

    def more(self) -> bool:
        """Append the next chunk of text; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(CHUNK)
        self._feed(data)
        self.eof = not data
        return not self.eof

    def drop(self, k: int) -> None:
        """Forget ``buf[:k]``, keeping the file position of what is left."""
        self.line, self.col = self.where(k)
        self.buf = self.buf[k:]
        self.pos -= k

    def where(self, p: int) -> tuple[int, int]:
        n = self.buf.count("\n", 0, p)
        return (self.line + n, p - self.buf.rfind("\n", 0, p)) if n else (self.line, self.col + p)

    def error(self, msg: str, at: tuple[int, int]) -> DataFileError:
        return DataFileError(
            f"{self.path}: not valid JSON at line {at[0]} column {at[1]}: {msg} "
            f"(a JSON array file must parse as a whole; JSON Lines files drop bad rows instead)"
        )

    def next_char(self) -> str | None:
        """Move past JSON whitespace; the next character, or None at the end of the file."""
        while True:
            m = _NOT_WS.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return m.group()
            self.pos = len(self.buf)
            self.drop(self.pos)
            if not self.more():
                return None

    def _item_end(self, i: int, depth: int, in_string: bool) -> tuple[int | None, int, int, bool]:
        """Scan ``buf`` from ``i`` for the end of the current item, in the nesting state ``depth`` / ``in_string``.

        Returns ``(end, i, depth, in_string)``: ``end`` is None when ``buf`` runs out first (scan on from ``i``
        with the returned state once more text is in).
        """
        buf = self.buf
        if depth == 0 and not in_string:  # a number, true, false or null
            m = _SCALAR_END.search(buf, i)
            return (m.start() if m else None), (m.start() if m else len(buf)), 0, False
        while True:
            if in_string:
                m = _IN_STRING.search(buf, i)
                if not m:
                    return None, len(buf), depth, True
                if m.group() == "\\":
                    if m.end() >= len(buf):  # the escaped character is in the next chunk
                        return None, m.start(), depth, True
                    i = m.end() + 1
                    continue
                in_string, i = False, m.end()
                if depth == 0:
                    return i, i, 0, False
                continue
            m = _STRUCTURE.search(buf, i)
            if not m:
                return None, len(buf), depth, False
            c, i = m.group(), m.end()
            if c == '"':
                in_string = True
            elif c in "[{":
                depth += 1
            else:
                depth -= 1
                if depth <= 0:
                    return i, i, 0, False

    def item(self, max_row_bytes: int) -> tuple[Any, str | None, int, int]:
        """The item at ``pos``: ``(value, text, bytes, start)``, and ``pos`` moves past it.

        ``bytes`` over ``max_row_bytes``: the item is too long, and neither value nor text is kept. Otherwise
        either ``text`` is None and ``value`` the item (the fast path: ``json``'s scanner parsed it in place), or
        ``text`` is its JSON text, still to parse, at ``buf[start:]``: when the fast path fails (the item runs past
        the text read so far, or is not valid JSON), the item is delimited by scanning its nesting, reading on as
        needed, and an item that outgrows the limit is scanned to its end without being kept.
        """
        s = self.pos
        try:
            value, end = _DECODER.raw_decode(self.buf, s)
        except UNPARSABLE:  # not valid JSON, or more than Python holds: delimited by the scan, parsed by the caller
            end = None
        if end is not None and (self.buf[end : end + 1] in _FOLLOWERS if end < len(self.buf) else self.eof):
            self.pos = end
            size = len(self.buf[s:end].encode("utf-8"))
            return (value if size <= max_row_bytes else None), None, size, s
        c = self.buf[s]
        depth, in_string = int(c in "[{"), c == '"'
        i = s + (depth or in_string)
        dropped = 0  # bytes of an oversized item already forgotten
        at = None  # where an oversized item started, for an error at the end of the file
        while True:
            end, i, depth, in_string = self._item_end(i, depth, in_string)
            if end is not None:
                break
            if dropped or i - s > max_row_bytes:  # characters > limit => bytes > limit: stop keeping the text
                at = at or self.where(s)
                dropped += len(self.buf[s:i].encode("utf-8"))
                self.drop(i)
                s = i = 0
            if not self.more():
                if dropped:
                    raise self.error("the file ends inside this item", at)
                end = len(self.buf)  # json.loads of the rest then names the error (or a scalar ends the file)
                break
        self.pos = end
        size = dropped + len(self.buf[s:end].encode("utf-8"))
        return None, (None if dropped or size > max_row_bytes else self.buf[s:end]), size, s


def _read_array(f: IO[bytes], path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    t = _ArrayText(f, path)
    t.next_char()
    t.pos += 1  # the "[" (the caller checked it is there)
    c, index = t.next_char(), 0
    while c != "]":
        if c is None:
            raise t.error("the file ends before the array's closing ]", t.where(t.pos))
        if t.pos > CHUNK:  # forget what was read, now and then (each time would copy the buffer per item)
            t.drop(t.pos)
        value, text, size, start = t.item(max_row_bytes)
        where = f"item {index}"
        if size > max_row_bytes:
            yield RawRow(index, where, drop="too_long", detail=_too_long(size, max_row_bytes), size=size)
        else:
            row = RawRow(index, where, value=value, size=size)
            if text is not None:  # delimited by the scan: parse it here, for the error position
                try:
                    row = RawRow(index, where, value=json.loads(text), size=size)
                except json.JSONDecodeError as e:
                    raise t.error(e.msg, t.where(start + e.pos)) from None
                except UNPARSABLE as e:  # valid JSON (the scan delimited it): this item only is dropped
                    row = RawRow(index, where, drop="unparsable_json", detail=_unparsable(e), size=size)
            yield row
        index += 1
        c = t.next_char()
        if c == ",":
            t.pos += 1
            if (c := t.next_char()) == "]":
                raise t.error("a comma before the closing ]", t.where(t.pos))
        elif c not in ("]", None):  # None: the loop's check names the end of the file
            raise t.error("Expecting ',' delimiter", t.where(t.pos))
    t.pos += 1  # the "]"
    if t.next_char() is not None:
        raise t.error("Extra data after the array", t.where(t.pos))


def _read_lines(f: IO[bytes], max_row_bytes: int) -> Iterator[RawRow]:
    index = line_no = 0
    while True:
        raw = f.readline(max_row_bytes + 1)  # never more than the limit in memory
        if not raw:
            return
        line_no += 1
        line = raw.removeprefix(BOM) if line_no == 1 else raw
        size = len(line)
        where = f"line {line_no}"
        if len(raw) > max_row_bytes:
            while not line.endswith(b"\n"):  # count the rest of the line without keeping it
                line = f.readline(CHUNK)
                if not line:
                    break
                size += len(line)
            yield RawRow(index, where, drop="too_long", detail=_too_long(size, max_row_bytes), size=size)
            index += 1
            continue
        if not line.strip():
            continue  # blank lines are not rows
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(index, where, drop="invalid_utf8", detail=f"bad byte at column {e.start + 1}", size=size)
        else:
            try:
                yield RawRow(index, where, value=json.loads(text), size=size)
            except json.JSONDecodeError as e:
                yield RawRow(index, where, drop="invalid_json", detail=f"column {e.colno}: {e.msg}", size=size)
            except UNPARSABLE as e:
                yield RawRow(index, where, drop="unparsable_json", detail=_unparsable(e), size=size)
        index += 1


def read_rows(path: str | Path, max_row_bytes: int = 1_048_576) -> Iterator[RawRow]:
    """Yield every row of a dataset file: a JSON array, or JSON Lines (``.jsonl``, or a ``.json`` that is not an
    array), either one plain or xz-compressed (``.json.xz``, ``.jsonl.xz``)."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f'{p} not found; put the file there or fix its "file_name" in dataset_info.json')
    if p.is_dir():
        raise DataFileError(f'{p} is a directory; "file_name" must name a .json or .jsonl file (or .json.xz ...)')
    empty = DataFileError(f"{p} is empty; it must hold a JSON array or JSON Lines of sharegpt conversations")
    if p.stat().st_size == 0:
        raise empty
    try:
        if data_suffix(p) != ".jsonl" and _is_json_array(p):
            with _open(p) as f:
                yield from _read_array(f, p, max_row_bytes)
            return
        n = 0
        with _open(p) as f:
            for row in _read_lines(f, max_row_bytes):
                n += 1
                yield row
    except (lzma.LZMAError, EOFError) as e:  # EOFError: an .xz file cut short
        raise DataFileError(
            f"{p}: cannot decompress it ({e}); the .xz file is damaged or not xz. Re-create it: xz -k FILE"
        ) from None
    if n == 0:
        raise empty
