"""PNG text chunks, read and written with the standard library only (bytes stay exact).

A PNG is the 8-byte signature followed by chunks: 4-byte big-endian length, 4-byte type, data, and a CRC-32 of
type + data. The first chunk is ``IHDR`` and the last ``IEND``. Character cards travel in text chunks:

- ``tEXt``: ``keyword NUL text`` (Latin-1; card payloads are base64, so ASCII);
- ``zTXt``: ``keyword NUL method(0) zlib-data``;
- ``iTXt``: ``keyword NUL compressed-flag method language NUL translated-keyword NUL text`` (UTF-8 text).

Reading checks the signature, every length and CRC, that ``IHDR`` comes first and that ``IEND`` ends the file; any
failure is a ``PngError`` saying where. ``find_text`` decodes only the chunk asked for (a compressed chunk under
another keyword is never inflated) and stops inflating at the caller's limit. Writing keeps every chunk of the input
as it was (bytes unchanged) except the text chunks whose keyword is replaced, and adds new ``tEXt`` chunks just
before ``IEND``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")


class PngError(ValueError):
    """Bytes that are not a well-formed PNG; the message says what is wrong and where."""


class TextTooLarge(PngError):
    """A text chunk whose text is over the reader's limit."""


@dataclass(frozen=True)
class Chunk:
    type: bytes
    data: bytes

    def encode(self) -> bytes:
        return struct.pack(">I", len(self.data)) + self.type + self.data + struct.pack(">I", crc(self.type, self.data))


def crc(type_: bytes, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(type_)) & 0xFFFFFFFF


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def read_chunks(data: bytes) -> list[Chunk]:
    """Every chunk of a PNG, checked: signature, lengths, CRCs, ``IHDR`` first, ``IEND`` last."""
    if not is_png(data):
        raise PngError("not a PNG (the file does not start with the PNG signature)")
    chunks: list[Chunk] = []
    pos = len(SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise PngError(f"truncated PNG: chunk header cut off at byte {pos} (no IEND chunk)")
        length, type_ = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise PngError(
                f"truncated PNG: chunk {type_.decode('latin-1')!r} at byte {pos} needs {length} bytes of data, "
                f"the file ends first"
            )
        body = data[pos + 8 : pos + 8 + length]
        (stored,) = struct.unpack(">I", data[end - 4 : end])
        if stored != crc(type_, body):
            raise PngError(f"bad CRC in chunk {type_.decode('latin-1')!r} at byte {pos} (the file is corrupted)")
        if not chunks and type_ != b"IHDR":
            raise PngError(f"the first chunk is {type_.decode('latin-1')!r}, a PNG starts with IHDR")
        chunks.append(Chunk(type_, body))
        pos = end
        if type_ == b"IEND":
            return chunks


def _inflate(data: bytes, key: str, limit: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)  # one byte past the limit tells "at the limit" from "over it"
    except zlib.error as e:
        raise PngError(f"compressed text chunk {key!r} does not inflate: {e}") from None
    if len(out) > limit:
        raise TextTooLarge(f"compressed text chunk {key!r} inflates past the limit of {limit} bytes")
    return out


def chunk_keyword(chunk: Chunk) -> str:
    """The keyword of a tEXt, zTXt or iTXt chunk."""
    return chunk.data.partition(b"\0")[0].decode("latin-1")


def decode_text_chunk(chunk: Chunk, limit: int) -> tuple[str, str]:
    """``(keyword, text)`` of a tEXt, zTXt or iTXt chunk whose text is at most ``limit`` bytes (inflating stops
    there)."""
    key, sep, rest = chunk.data.partition(b"\0")
    if not sep:
        raise PngError(f"{chunk.type.decode()} chunk without the NUL after its keyword")
    key = key.decode("latin-1")
    if chunk.type == b"tEXt":
        text = rest
    elif chunk.type == b"zTXt":
        if not rest or rest[0] != 0:
            raise PngError(f"zTXt chunk {key!r}: unknown compression method")
        text = _inflate(rest[1:], key, limit)
    else:  # iTXt: compression flag, method, language NUL, translated keyword NUL, UTF-8 text
        if len(rest) < 2:
            raise PngError(f"iTXt chunk {key!r} is cut short")
        flag, method, tail = rest[0], rest[1], rest[2:]
        parts = tail.split(b"\0", 2)
        if len(parts) != 3:
            raise PngError(f"iTXt chunk {key!r} is cut short")
        text = parts[2]
        if flag:
            if method != 0:
                raise PngError(f"iTXt chunk {key!r}: unknown compression method")
            text = _inflate(text, key, limit)
    if len(text) > limit:
        raise TextTooLarge(f"text chunk {key!r} of {len(text)} bytes is over the limit of {limit} bytes")
    if chunk.type != b"iTXt":
        return key, text.decode("latin-1")
    try:
        return key, text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PngError(f"iTXt chunk {key!r}: text is not UTF-8 ({e.reason} at byte {e.start})") from None


def find_text(data: bytes, keywords: Sequence[str], limit: int) -> tuple[str, str] | None:
    """``(keyword, text)`` of the first text chunk with the first of ``keywords`` (in order of preference) the PNG
    has, or None. Only that chunk is decoded, its text at most ``limit`` bytes: the other text chunks are never
    inflated, so what one call inflates in all is bounded by ``limit`` too."""
    found: dict[str, Chunk] = {}
    for chunk in read_chunks(data):
        if chunk.type in TEXT_TYPES:
            found.setdefault(chunk_keyword(chunk), chunk)
    for key in keywords:
        if key in found:
            return decode_text_chunk(found[key], limit)
    return None


def text_chunk(keyword: str, text: str) -> Chunk:
    """A tEXt chunk (keyword 1-79 Latin-1 characters; text Latin-1)."""
    if not 1 <= len(keyword) <= 79:
        raise PngError(f"tEXt keyword {keyword!r} must be 1 to 79 characters")
    return Chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def write_text(data: bytes, texts: dict[str, str]) -> bytes:
    """The PNG ``data`` with a tEXt chunk per ``texts`` item just before IEND; text chunks that had one of these
    keywords are dropped, every other chunk is kept byte for byte."""
    chunks = read_chunks(data)
    kept = [c for c in chunks[:-1] if not (c.type in TEXT_TYPES and chunk_keyword(c) in texts)]
    new = [text_chunk(k, v) for k, v in texts.items()]
    return SIGNATURE + b"".join(c.encode() for c in [*kept, *new, chunks[-1]])


def placeholder_png(width: int = 64, height: int = 64, rgb: tuple[int, int, int] = (200, 200, 210)) -> bytes:
    """A small valid PNG of one flat colour (8-bit RGB), for cards exported without an image."""
    row = b"\0" + bytes(rgb) * width  # filter type 0, then the pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [Chunk(b"IHDR", ihdr), Chunk(b"IDAT", zlib.compress(row * height, 9)), Chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(c.encode() for c in chunks)
