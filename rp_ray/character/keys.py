"""Lorebook keys: what a key is, whether it is usable (checked when a card or lorebook is read), and whether it
occurs in a text. Keys are matched as SillyTavern matches them (``world-info.js``, ``matchKeys``), whatever an
entry's ``use_regex`` says (SillyTavern's own card export sets it on every entry):

- A key is trimmed of surrounding whitespace; an empty one never matches.
- A key is a regular expression only when the whole key reads ``/pattern/flags``: flags from ``gimsuy``, each at
  most once, and no unescaped ``/`` inside the pattern. The regex alone then decides: ``i`` makes it
  case-insensitive, ``s`` lets ``.`` match a newline, ``m`` makes ``^``/``$`` match at line ends; ``g``, ``u`` and
  ``y`` change nothing for a yes/no match. It runs on RE2, a linear-time engine, so a card's regex cannot stall a
  chat; a key RE2 refuses (backreferences, look-around) is refused when the card or lorebook is read.
- Any other key is plain text: both sides lower-cased unless case-sensitive. With match-whole-words a key of one
  word counts only between non-word characters (anything but ASCII letters, digits and ``_``) or the ends of the
  text; a key of several words, and any key without match-whole-words, counts wherever it occurs.

The ``@@`` decorators at the top of an entry's content are parsed here too, since two of them add keys.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

import re2

log = logging.getLogger(__name__)

MAX_ENTRY_KEYS = 64
MAX_KEY_CHARS = 1024
MAX_INT_DIGITS = 9

# JavaScript's whitespace (its \s, and what String.prototype.trim removes): SillyTavern trims keys with it and
# tells one-word keys from several-word keys by it
JS_SPACE = (
    "\t\n\v\f\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
REGEX_FLAGS = "gimsuy"
UNESCAPED_SLASH = re.compile(r"(?:^|[^\\])/")


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused key is reported as a CardError, not written to stderr by RE2
    return options


RE2_OPTIONS = _re2_options()


def ascii_int(value: str) -> int | None:
    """``value`` as an int when it is 1 to ``MAX_INT_DIGITS`` ASCII digits, else None (``str.isdigit`` also accepts
    digits such as '²' that ``int`` refuses, and ``int`` refuses numbers of thousands of digits)."""
    if 0 < len(value) <= MAX_INT_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    return None


def _utf8(text: str) -> bytes:
    # JSON may carry lone surrogates; RE2 reads the bytes they give as invalid UTF-8 instead of failing
    return text.encode("utf-8", "surrogatepass")


def trim(key: str) -> str:
    return key.strip(JS_SPACE)


def regex_key(key: str) -> tuple[str, str] | None:
    """``(pattern, flags)`` when the (trimmed) ``key`` reads ``/pattern/flags``, else None (a plain-text key)."""
    end = key.rfind("/")
    pattern, flags = key[1:end], key[end + 1 :]
    if not key.startswith("/") or end < 2 or len(set(flags)) != len(flags) or not set(flags) <= set(REGEX_FLAGS):
        return None  # SillyTavern's RegExp refuses repeated flags, so such a key is plain text there
    return None if UNESCAPED_SLASH.search(pattern) else (pattern, flags)


@functools.lru_cache(maxsize=4096)
def compile_key(key: str) -> tuple[Any, str | None]:
    """``(program, None)`` for a regex key RE2 runs, ``(None, why)`` for one it refuses, ``(None, None)`` for a
    plain-text key; ``key`` is trimmed."""
    parsed = regex_key(key)
    if parsed is None:
        return None, None
    pattern, flags = parsed
    inline = "".join(f for f in "ims" if f in flags)
    try:
        return re2.compile(_utf8(f"(?{inline})" * bool(inline) + pattern), RE2_OPTIONS), None
    except re2.error as e:
        reason = e.args[0] if e.args else "refused"
        return None, reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)


@functools.lru_cache(maxsize=4096)
def _whole_word(word: str) -> Any:
    # SillyTavern's boundaries: a non-word character (JavaScript's \W, ASCII-only as RE2's is) or an end of the text
    return re2.compile(rb"(?:^|\W)" + re2.escape(_utf8(word)) + rb"(?:$|\W)", RE2_OPTIONS)


class Haystack:
    """A text keys are matched against, in the forms the keys need (as it is, lower-cased, and the UTF-8 of each for
    RE2), each made once however many keys try it. ``a + b`` is ``a``, a newline, then ``b``, its forms joined from
    theirs: lower-casing works per character and does not look across a newline, so recursive scanning lower-cases
    only the lore each round adds."""

    def __init__(self, text: str, parts: tuple[Haystack, Haystack] | None = None) -> None:
        self.text = text
        self._parts = parts

    def __add__(self, other: Haystack) -> Haystack:
        return Haystack(f"{self.text}\n{other.text}", (self, other))

    @functools.cached_property
    def lower(self) -> str:
        return f"{self._parts[0].lower}\n{self._parts[1].lower}" if self._parts else self.text.lower()

    @functools.cached_property
    def utf8(self) -> bytes:
        return self._parts[0].utf8 + b"\n" + self._parts[1].utf8 if self._parts else _utf8(self.text)

    @functools.cached_property
    def lower_utf8(self) -> bytes:
        return self._parts[0].lower_utf8 + b"\n" + self._parts[1].lower_utf8 if self._parts else _utf8(self.lower)


@functools.lru_cache(maxsize=256)
def _warn_refused(key: str, reason: str) -> None:
    log.warning("lorebook key %r: RE2 refuses it (%s); it never matches", key, reason)


def key_matches(key: str, text: str | Haystack, *, case_sensitive: bool = False, whole_words: bool = False) -> bool:
    """Whether one key occurs in ``text`` (rules in the module docstring). A regex key RE2 refuses never matches here
    (logged); reading a card or lorebook refuses it before it gets here."""
    key = trim(key)
    if not key:
        return False
    hay = text if isinstance(text, Haystack) else Haystack(text)
    program, refused = compile_key(key)
    if refused is not None:
        _warn_refused(key, refused)
        return False
    if program is not None:
        return program.search(hay.utf8) is not None
    needle = key if case_sensitive else key.lower()
    if whole_words and not any(c in JS_SPACE for c in needle):
        return _whole_word(needle).search(hay.utf8 if case_sensitive else hay.lower_utf8) is not None
    return needle in (hay.text if case_sensitive else hay.lower)


# -- decorators ----------------------------------------------------------------------------------------------------


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
    """The decorator lines at the top of ``content`` (``@@name value``; ``@@@`` fallbacks are ignored, as is a
    ``@@scan_depth`` that is not a plain number)."""
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
        elif name == "scan_depth" and (depth := ascii_int(value)) is not None:
            found[name] = depth
        elif name in ("additional_keys", "exclude_keys"):
            found[name] = found.get(name, ()) + _key_list(value)
        else:
            ignored.append(name)
        n += 1
    return Decorators(text="\n".join(lines[n:]), ignored=tuple(ignored), **found)


# -- the check on reading --------------------------------------------------------------------------------------------


def check_keys(keys: list[str], secondary_keys: list[str], content: str, name: str | None = None) -> None:
    """Raise ``ValueError`` (what is wrong and the fix) when an entry has more than ``MAX_ENTRY_KEYS`` keys (its
    ``keys``, ``secondary_keys`` and decorator keys together), a key longer than ``MAX_KEY_CHARS``, or a regex key RE2
    refuses; these bound what scanning one entry costs. ``name`` (the entry's) is named in the message."""
    of = f" in entry {name!r}" if name else ""
    deco = parse_decorators(content)
    named = [
        *((f"keys[{j}]", k) for j, k in enumerate(keys)),
        *((f"secondary_keys[{j}]", k) for j, k in enumerate(secondary_keys)),
        *(("@@additional_keys", k) for k in deco.additional_keys),
        *(("@@exclude_keys", k) for k in deco.exclude_keys),
    ]
    if len(named) > MAX_ENTRY_KEYS:
        raise ValueError(
            f"{len(named)} keys{of} (keys, secondary_keys and @@additional_keys / @@exclude_keys together), over the "
            f"limit of {MAX_ENTRY_KEYS} per entry; merge keys into one regex key such as /sword|blade/i, or split "
            f"the entry"
        )
    for where, key in named:
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(
                f"{where}{of}: a key of {len(key)} characters, over the limit of {MAX_KEY_CHARS}; shorten it"
            )
        _, refused = compile_key(trim(key))
        if refused is not None:
            raise ValueError(
                f"{where} {key!r}{of}: RE2, the linear-time engine lorebook regexes run on, refuses it ({refused}); "
                f"rewrite it without backreferences or look-around, or drop the surrounding slashes to match it as "
                f"plain text"
            )
