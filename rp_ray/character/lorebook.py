"""Lorebooks (a card's ``character_book``, or a standalone file): which entries a chat turn brings into the prompt.

Activation (``activate``), following Character Card V2/V3:

- The scan window is the last ``scan_depth`` messages (``DEFAULT_SCAN_DEPTH`` = 2, SillyTavern's default, when the
  book sets none; 0 scans nothing). Entries with ``enabled: false`` are never used.
- ``constant`` entries are always in. Another entry is in when any of its ``keys`` occurs in the window, each key
  matched as SillyTavern matches it (``keys.py``: ``/pattern/flags`` keys are regexes run on RE2, any other key is
  plain text, whatever ``use_regex`` says); plain keys are case-insensitive and match anywhere unless the entry is
  case-sensitive or matches whole words (``match_options``). A ``selective`` entry also needs one of its
  ``secondary_keys`` (with no secondary keys it acts as a plain entry).
- With the book's ``recursive_scanning``, the window followed by the text of the activated entries is scanned
  again, round after round, until a round adds nothing or ``MAX_RECURSION_ROUNDS`` rounds have run.
- A ``deadline`` (``time.monotonic``) stops the scan with a ``TimeoutError`` once passed: a served prompt has a
  time budget, and the thread building it cannot be stopped from outside.
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
case_sensitive, ``matchWholeWords`` -> ``extensions["match_whole_words"]`` (where SillyTavern's card export puts it);
every other field kept under ``extensions["sillytavern"]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
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
from rp_ray.character.keys import Decorators, Haystack, ascii_int, key_matches, parse_decorators

log = logging.getLogger(__name__)

DEFAULT_SCAN_DEPTH = 2
DEFAULT_TOKEN_BUDGET = 2048
MAX_LOREBOOK_BYTES = 10 * MAX_JSON_BYTES
MAX_RECURSION_ROUNDS = 8


def entry_text(entry: BookEntry) -> str:
    """What an entry puts into the prompt: its content without the ``@@`` decorator lines."""
    return parse_decorators(entry.content).text


def _setting(name: str, *sources: dict[str, Any]) -> bool:
    for source in sources:
        if isinstance(source.get(name), bool):
            return source[name]
    return False


def match_options(entry: BookEntry, book: Lorebook | None = None) -> dict[str, bool]:
    """How an entry's plain-text keys match (``key_matches`` keywords): case-sensitive by its ``case_sensitive``,
    else its ``extensions.case_sensitive`` (where SillyTavern's export writes it), else the book's
    ``extensions.case_sensitive``; whole words by its ``extensions.match_whole_words``, else the book's; off when
    none is set."""
    book_ext = book.extensions if book is not None else {}
    case = entry.case_sensitive
    if case is None:
        case = _setting("case_sensitive", entry.extensions, book_ext)
    return {"case_sensitive": case, "whole_words": _setting("match_whole_words", entry.extensions, book_ext)}


def entry_matches(
    entry: BookEntry, text: str | Haystack, book: Lorebook | None = None, deco: Decorators | None = None
) -> bool:
    """Whether an enabled, non-constant entry is triggered by ``text`` (keys, selective secondary keys, excludes)."""
    deco = deco or parse_decorators(entry.content)
    hay = text if isinstance(text, Haystack) else Haystack(text)
    opts = match_options(entry, book)
    if not any(key_matches(k, hay, **opts) for k in (*entry.keys, *deco.additional_keys)):
        return False
    if entry.selective and entry.secondary_keys and not any(key_matches(k, hay, **opts) for k in entry.secondary_keys):
        return False
    return not any(key_matches(k, hay, **opts) for k in deco.exclude_keys)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError("the lorebook scan ran past the prompt's deadline")


def _window(messages: Sequence[str], depth: int) -> str:
    return "\n".join(messages[-depth:]) if depth > 0 else ""


def activate(
    book: Lorebook,
    messages: Sequence[str],
    count_tokens: Callable[[str], int],
    *,
    default_scan_depth: int = DEFAULT_SCAN_DEPTH,
    default_token_budget: int = DEFAULT_TOKEN_BUDGET,
    deadline: float | None = None,
) -> list[BookEntry]:
    """The entries to insert for a chat whose message texts are ``messages`` (oldest first), within the budget,
    ordered by ``insertion_order`` (rules in the module docstring)."""
    depth = book.scan_depth if book.scan_depth is not None else default_scan_depth
    budget = book.token_budget if book.token_budget is not None else default_token_budget
    live = [(i, e, parse_decorators(e.content)) for i, e in enumerate(book.entries) if e.enabled]
    # each entry scans its own window (@@scan_depth) or the book's; entries sharing a depth share one haystack
    own_depth = {i: depth if d.scan_depth is None else d.scan_depth for i, _, d in live}
    windows = {k: Haystack(_window(messages, k)) for k in set(own_depth.values())}
    active: dict[int, BookEntry] = {}

    def scan(lore: Haystack | None) -> dict[int, BookEntry]:
        hays = {k: w if lore is None else w + lore for k, w in windows.items()}
        found = {}
        for i, e, d in live:
            _check_deadline(deadline)  # per entry: one round over a large book and a long lore can take a while
            if (
                i not in active
                and not d.dont_activate
                and (lore is None and (e.constant or d.activate) or entry_matches(e, hays[own_depth[i]], book, d))
            ):
                found[i] = e
        return found

    active |= scan(None)
    if book.recursive_scanning:
        # the window, a newline, then the text of every active entry (by activation) is scanned again, the lore
        # growing by what each round adds
        lore = Haystack("\n".join(entry_text(e) for e in active.values()))
        for _ in range(MAX_RECURSION_ROUNDS):
            new = scan(lore)
            if not new:
                break
            added = Haystack("\n".join(entry_text(e) for e in new.values()))
            lore = lore + added if active else added
            active |= new
        else:
            log.debug("lorebook recursion stopped after %d rounds", MAX_RECURSION_ROUNDS)

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
        rest = {f: v for f, v in e.items() if f not in ST_FIELDS | {"comment", "caseSensitive", "matchWholeWords"}}
        extensions: dict[str, Any] = {"sillytavern": rest}
        if isinstance(e.get("matchWholeWords"), bool):
            extensions["match_whole_words"] = e["matchWholeWords"]
        uid = ascii_int(k)
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
                "id": e.get("uid", k if uid is None else uid),
                "comment": e.get("comment") or "",
                "case_sensitive": e.get("caseSensitive"),
                "extensions": extensions,
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
