"""Lorebooks (a card's ``character_book``, or a standalone file): which entries a chat turn brings into the prompt.

Activation (``activate``), following Character Card V2/V3:

- The scan window is the last ``scan_depth`` messages (``DEFAULT_SCAN_DEPTH`` = 2, SillyTavern's default, when the
  book sets none; 0 scans nothing). Entries with ``enabled: false`` are never used.
- ``constant`` entries are always in. Another entry is in when any of its ``keys`` occurs in the window: a plain
  substring match, case-insensitive unless the entry is ``case_sensitive``. A ``selective`` entry also needs one of
  its ``secondary_keys`` (with no secondary keys it acts as a plain entry). With ``use_regex`` every key is a
  regular expression; a key written ``/pattern/flags`` (flags ``i m s x``; ``g`` and ``u`` ignored) is one in any
  case, as SillyTavern reads them. A key that does not compile is logged and never matches.
- With the book's ``recursive_scanning``, the content of the activated entries is scanned too, round after round,
  until a round adds nothing (at most one round per entry).
- V3 decorators, lines at the top of ``content`` starting with ``@@`` (``@@@`` fallbacks too), never reach the
  prompt. Honoured: ``@@activate`` (always in), ``@@dont_activate`` (never in), ``@@scan_depth N`` (this entry's
  window), ``@@additional_keys a,b`` (more keys), ``@@exclude_keys a,b`` (out when one matches); others ignored.
- Budget: activated entries are ranked constant first, then higher ``priority`` (absent = 0), then lower
  ``insertion_order``, then book order; they are taken while the running token count (``count_tokens`` of each
  entry's text; serving passes the served model's tokenizer) stays within ``token_budget``
  (``DEFAULT_TOKEN_BUDGET`` when the book sets none); the first entry that does not fit ends the list, so a lower
  ranked entry never displaces a higher one. The inserted entries come back by ``insertion_order`` ascending (lower
  = earlier in the prompt); ``position`` ``before_char`` (the default) or ``after_char`` says where (``prompt.py``).

``load_lorebook_file`` reads a standalone lorebook: the character_book shape (``{"entries": [...]}``), V3's
``{"spec": "lorebook_v3", "data": {...}}``, or a SillyTavern world-info export (``{"entries": {"0": {"key",
"keysecondary", "content", "constant", "selective", "order", "disable", "position": 0|1, ...}}}``) converted to the
same entries (``key`` -> keys, ``keysecondary`` -> secondary_keys, ``order`` -> insertion_order, ``disable`` -> not
enabled, ``position`` 0 -> before_char and any other -> after_char, ``uid`` -> id, ``caseSensitive`` ->
case_sensitive; every other field kept under ``extensions["sillytavern"]``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rp_ray.character.card import (
    MAX_JSON_BYTES,
    BookEntry,
    CardError,
    Lorebook,
    decode_json,
    read_file_bytes,
    validation_message,
)

log = logging.getLogger(__name__)

DEFAULT_SCAN_DEPTH = 2
DEFAULT_TOKEN_BUDGET = 2048
MAX_LOREBOOK_BYTES = 10 * MAX_JSON_BYTES
REGEX_KEY = re.compile(r"^/(.+)/([gimsuxy]*)$", re.DOTALL)
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass(frozen=True)
class Decorators:
    """The ``@@`` decorators of an entry that activation honours, and the content without them."""

    text: str
    activate: bool = False
    dont_activate: bool = False
    scan_depth: int | None = None
    additional_keys: tuple[str, ...] = ()
    exclude_keys: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def _key_list(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


def parse_decorators(content: str) -> Decorators:
    if not content.startswith("@@"):
        return Decorators(text=content)
    lines = content.split("\n")
    n = 0
    found: dict[str, Any] = {}
    ignored: list[str] = []
    while n < len(lines) and lines[n].startswith("@@"):
        name, _, value = lines[n].lstrip("@").partition(" ")
        value = value.strip()
        if name in ("activate", "dont_activate"):
            found[name] = True
        elif name == "scan_depth" and value.isdigit():
            found[name] = int(value)
        elif name in ("additional_keys", "exclude_keys"):
            found[name] = found.get(name, ()) + _key_list(value)
        else:
            ignored.append(name)
        n += 1
    return Decorators(text="\n".join(lines[n:]), ignored=tuple(ignored), **found)


def entry_text(entry: BookEntry) -> str:
    """What an entry puts into the prompt: its content without the ``@@`` decorator lines."""
    return parse_decorators(entry.content).text


@functools.lru_cache(maxsize=4096)
def _compile(key: str, regex: bool, case_sensitive: bool) -> re.Pattern[str] | None:
    m = REGEX_KEY.match(key)
    if m:
        pattern, flags = m.group(1), 0
        for f in m.group(2):
            flags |= REGEX_FLAGS.get(f, 0)
    elif regex:
        pattern, flags = key, 0 if case_sensitive else re.IGNORECASE
    else:
        return None
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        log.warning("lorebook key %r is not a valid regular expression (%s); it never matches", key, e)
        return re.compile(r"(?!)")


def key_matches(key: str, text: str, *, case_sensitive: bool = False, regex: bool = False) -> bool:
    """Whether one key occurs in ``text`` (substring, or regex for ``use_regex`` / ``/pattern/flags`` keys)."""
    if not key.strip():
        return False
    pattern = _compile(key, regex, case_sensitive)
    if pattern is not None:
        return pattern.search(text) is not None
    return key in text if case_sensitive else key.casefold() in text.casefold()


def entry_matches(entry: BookEntry, text: str) -> bool:
    """Whether an enabled, non-constant entry is triggered by ``text`` (keys, selective secondary keys, excludes)."""
    deco = parse_decorators(entry.content)
    opts = {"case_sensitive": bool(entry.case_sensitive), "regex": bool(entry.use_regex)}
    if not any(key_matches(k, text, **opts) for k in (*entry.keys, *deco.additional_keys)):
        return False
    if entry.selective and entry.secondary_keys and not any(key_matches(k, text, **opts) for k in entry.secondary_keys):
        return False
    return not any(key_matches(k, text, **opts) for k in deco.exclude_keys)


def _window(messages: Sequence[str], depth: int) -> str:
    return "\n".join(messages[-depth:]) if depth > 0 else ""


def activate(
    book: Lorebook,
    messages: Sequence[str],
    count_tokens: Callable[[str], int],
    *,
    default_scan_depth: int = DEFAULT_SCAN_DEPTH,
    default_token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> list[BookEntry]:
    """The entries to insert for a chat whose message texts are ``messages`` (oldest first), within the budget,
    ordered by ``insertion_order`` (rules in the module docstring)."""
    depth = book.scan_depth if book.scan_depth is not None else default_scan_depth
    budget = book.token_budget if book.token_budget is not None else default_token_budget
    live = [(i, e, parse_decorators(e.content)) for i, e in enumerate(book.entries) if e.enabled]
    # each entry scans its own window (@@scan_depth) or the book's
    windows = {i: _window(messages, depth if d.scan_depth is None else d.scan_depth) for i, _, d in live}
    active: dict[int, BookEntry] = {}
    for i, e, d in live:
        if not d.dont_activate and (e.constant or d.activate or entry_matches(e, windows[i])):
            active[i] = e
    if book.recursive_scanning:
        for _ in range(len(live)):
            lore = "\n".join(entry_text(e) for e in active.values())
            new = {
                i: e
                for i, e, d in live
                if i not in active and not d.dont_activate and entry_matches(e, windows[i] + "\n" + lore)
            }
            if not new:
                break
            active |= new

    def rank(i: int) -> tuple[Any, ...]:
        e = active[i]
        forced = bool(e.constant) or parse_decorators(e.content).activate
        return (not forced, -(e.priority or 0), e.insertion_order, i)

    used, chosen = 0, []
    for i in sorted(active, key=rank):
        cost = count_tokens(entry_text(active[i]))
        if used + cost > budget:
            log.debug("lorebook budget %d reached: entry %s and lower ranked ones left out", budget, i)
            break
        used += cost
        chosen.append(i)
    return [active[i] for i in sorted(chosen, key=lambda i: (active[i].insertion_order, i))]


# -- standalone lorebook files ---------------------------------------------------------------------------------

ST_FIELDS = {"key", "keysecondary", "content", "constant", "selective", "order", "disable", "position", "uid"}


def from_world_info(obj: dict[str, Any], source: str) -> dict[str, Any]:
    """A SillyTavern world-info export as a character_book-shaped dict (mapping in the module docstring)."""
    entries = []
    for k, e in obj["entries"].items():
        if not isinstance(e, dict):
            raise CardError(f"{source}: field entries.{k}: a world-info entry is an object")
        rest = {f: v for f, v in e.items() if f not in ST_FIELDS | {"comment", "caseSensitive"}}
        entries.append(
            {
                "keys": e.get("key") or [],
                "secondary_keys": e.get("keysecondary") or [],
                "content": e.get("content") or "",
                "constant": bool(e.get("constant", False)),
                "selective": bool(e.get("selective", False)),
                "insertion_order": e.get("order", 100),
                "enabled": not e.get("disable", False),
                "position": "before_char" if e.get("position", 0) == 0 else "after_char",
                "id": e.get("uid", int(k) if str(k).isdigit() else k),
                "comment": e.get("comment") or "",
                "case_sensitive": e.get("caseSensitive"),
                "extensions": {"sillytavern": rest},
            }
        )
    book = {k: v for k, v in obj.items() if k != "entries"}
    return {**book, "entries": entries}


def lorebook_from_dict(obj: Any, source: str) -> Lorebook:
    if isinstance(obj, dict) and obj.get("spec") == "lorebook_v3" and isinstance(obj.get("data"), dict):
        obj = obj["data"]
    if not isinstance(obj, dict) or "entries" not in obj:
        raise CardError(
            f"{source}: not a lorebook: expected an object with entries (a list, as in a card's character_book, "
            f"or SillyTavern's world-info object of entries)"
        )
    if isinstance(obj["entries"], dict):
        obj = from_world_info(obj, source)
    try:
        return Lorebook.model_validate(obj)
    except ValidationError as e:
        raise CardError(validation_message(source, "", e, "fix the field in the lorebook")) from None


def load_lorebook_file(path: str | Path) -> Lorebook:
    """A standalone lorebook JSON file (character_book shape, ``lorebook_v3``, or SillyTavern world info)."""
    raw = read_file_bytes(path)
    if len(raw) > MAX_LOREBOOK_BYTES:
        raise CardError(f"{path}: {len(raw)} bytes is over the {MAX_LOREBOOK_BYTES >> 20} MiB limit for a lorebook")
    return lorebook_from_dict(decode_json(raw, str(path)), str(path))
