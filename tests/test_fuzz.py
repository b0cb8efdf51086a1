"""Fuzzing of what users upload: character cards (JSON and PNG, through the server's own import path), lorebooks
(parsing and activation) and dataset files (the row reader and the sharegpt validation), fed hostile structures:
random JSON trees, deep nesting, huge numbers, odd Unicode (lone surrogates included), regex-ish lorebook keys and
random PNG chunk sequences.

Each call must end in a result or in the project's own error for that input (``CardError``, ``PngError``,
``DataFileError``, ``Dropped``), within ``TIME_LIMIT_S`` and ``MEMORY_LIMIT`` of Python allocations. The suite runs
``FUZZ_EXAMPLES`` examples per target; ``RP_RAY_FUZZ_SECONDS=120`` runs each target for that many seconds instead
(round after round, each with fresh random examples):

    RP_RAY_FUZZ_SECONDS=120 .venv/bin/python -m pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import base64
import json
import lzma
import os
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rp_ray.character import png
from rp_ray.character.card import CardError, card_from_dict, parse_card
from rp_ray.character.catalog import Catalog
from rp_ray.character.keys import key_matches
from rp_ray.character.lorebook import activate, lorebook_from_dict
from rp_ray.config import ServeConfig
from rp_ray.data import DataFileError, Dropped, Message, load_registry, read_rows, to_conversation
from rp_ray.data.conversation import DROP_REASONS

TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 256 << 20
FUZZ_SECONDS = float(os.environ.get("RP_RAY_FUZZ_SECONDS") or 0)
FUZZ_EXAMPLES = 150

# deadline=None: the limits are checked per call by `bounded` (a Hypothesis deadline would count the strategies'
# own work and tracemalloc's overhead); the health checks are off because hostile inputs are large and slow on purpose
settings.register_profile(
    "rp_ray-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
FUZZ = settings.get_profile("rp_ray-fuzz")


def bounded(allowed: tuple[type[BaseException], ...], fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, or None when it raised one of ``allowed`` (the exact types: a ``UnicodeEncodeError`` is a
    ``ValueError`` but no project error); fails on any other exception, a call over ``TIME_LIMIT_S`` or a peak of
    Python allocations over ``MEMORY_LIMIT``."""
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kw)
    except allowed as e:
        if not any(type(e) is a or (a is not ValueError and isinstance(e, a)) for a in allowed):
            raise
        result = None
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{getattr(fn, '__name__', fn)}: peak of {peak >> 20} MiB"
    if elapsed > TIME_LIMIT_S:
        # tracemalloc slows allocation-heavy code several times: the time that counts is an untraced run's
        t0 = time.perf_counter()
        try:
            fn(*args, **kw)
        except allowed:
            pass
        elapsed = time.perf_counter() - t0
        assert elapsed <= TIME_LIMIT_S, f"{getattr(fn, '__name__', fn)}: took {elapsed:.2f} s"
    return result


def run_fuzz(test: Callable[[], None]) -> None:
    """A ``@given`` test: once (``FUZZ_EXAMPLES`` examples), or for ``RP_RAY_FUZZ_SECONDS``, a new run each time
    one ends (Hypothesis has no time budget; each run draws fresh random examples)."""
    if FUZZ_SECONDS <= 0:
        test()
        return
    end = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < end:
        test()


# -- strategies ------------------------------------------------------------------------------------------------

ODD_PIECES = [
    "\x00",
    "\ud800",
    "\udfff",
    "\ud83d",
    "\ufeff",
    "\u202e",
    "\u0301",
    "\U0001f600",
    "\uffff",
    "\U0010ffff",
    "\u2028",
    "\u3000",
    "{{char}}",
    "<BOT>",
    "{{user}}",
    "<USER>",
    "{{original}}",
    "<START>",
    "@@activate",
    "\n",
    "/",
    "\\",
    '"',
    "a" * 30,
    "春日",
]
chars = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),  # lone surrogates
)
odd_text = st.one_of(st.text(chars, max_size=30), st.lists(st.sampled_from(ODD_PIECES), max_size=12).map("".join))
# json.loads gives ints of at most 4300 digits (Python's int/str limit), and inf / nan from 1e999 / NaN
huge_ints = st.integers(0, 4299).map(lambda n: 10**n) | st.integers(0, 4299).map(lambda n: -(10**n))
numbers = st.one_of(st.integers(), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
CARD_FIELDS = [
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "extensions",
    "character_book",
    "entries",
    "keys",
    "content",
    "spec",
    "data",
    "rp_ray",
    "adapter",
    "sampling",
    "depth_prompt",
]
json_keys = st.one_of(odd_text, st.sampled_from(CARD_FIELDS))
trees = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(json_keys, kids, max_size=5),
    max_leaves=30,
)


class _Shown:
    """A deep structure shows as one line in Hypothesis's reports (printing it whole overflows the stack)."""

    depth = 0

    def __repr__(self) -> str:
        return f"<{type(self).__base__.__name__} nested {self.depth} deep>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class DeepList(_Shown, list):
    pass


class DeepDict(_Shown, dict):
    pass


def nested(depth: int, kind: str) -> Any:
    """A list or dict nested ``depth`` levels (built without recursion)."""
    value: Any = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"data": value}
    top = DeepList(value) if kind == "list" else DeepDict(value)
    top.depth = depth
    return top


# objects as deep as json.loads makes them (its C parser stops near the recursion limit); deeper nesting is fed as text
deep = st.builds(nested, st.integers(1, 500), st.sampled_from(["list", "dict"]))

REGEX_PIECES = [
    "a",
    "a+",
    "(a+)+",
    "(a|aa)*",
    "(a*)*b",
    "\\1",
    "(?=a)",
    "(?<=a)",
    "(?!a)",
    "(?P<n>a)(?P=n)",
    "[",
    "]",
    "[^a]",
    "\\",
    "\\/",
    ".*",
    "{",
    "}",
    "{1000}",
    "{1000,}",
    "(",
    ")",
    "^",
    "$",
    "\\b",
    "\\w+",
    "\\p{L}",
    "\\d+",
    "|",
    "?",
    "春日",
    "\ud800",
    "x{2}{2}{2}",
    "(?i)",
    "(?x)",
    " ",
]
regex_keys = st.builds(
    lambda pieces, flags, pad: f"{pad}/{''.join(pieces)}/{flags}{pad}",
    st.lists(st.sampled_from(REGEX_PIECES), min_size=0, max_size=8),
    st.text("gimsuyxg", max_size=4),
    st.sampled_from(["", " ", "\u3000"]),
)
keys = st.one_of(regex_keys, odd_text, st.sampled_from(["aoi", "Aoi", "sword", "a", "黒澤", " "]))
decorated = st.builds(
    lambda lines, text: "\n".join([*lines, text]),
    st.lists(
        st.one_of(
            st.builds(lambda ks: "@@additional_keys " + ",".join(ks), st.lists(keys, max_size=4)),
            st.builds(lambda ks: "@@exclude_keys " + ",".join(ks), st.lists(keys, max_size=4)),
            st.builds(lambda n: f"@@scan_depth {n}", st.one_of(st.integers(), st.text(max_size=12))),
            st.sampled_from(["@@activate", "@@dont_activate", "@@@fallback", "@@", "@@position after_char"]),
        ),
        max_size=4,
    ),
    odd_text,
)
content = st.one_of(odd_text, decorated, st.integers(0, 8000).map(lambda n: "{{char}}" * n))


def optional(loose: bool, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """Dicts with any subset of ``fields``, each value of its strategy or, when ``loose``, sometimes any JSON tree."""
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, v, v, trees) if loose else v for k, v in fields.items()})


def merged(required: dict[str, st.SearchStrategy], rest: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda base, more: {**base, **more}, st.fixed_dictionaries(required), rest)


MATCH_OPTIONS = st.fixed_dictionaries(
    {}, optional={"case_sensitive": st.booleans(), "match_whole_words": st.booleans()}
)


def book_strategies(loose: bool, text: st.SearchStrategy) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(lorebook entries, lorebooks): of the spec's types (``loose`` False: mostly valid, so activation and prompts
    run on them) or with any JSON in any field."""
    body = st.one_of(text, decorated, st.integers(0, 8000).map(lambda n: "{{char}}" * n))
    entry = merged(
        {"keys": st.lists(keys, max_size=5), "content": body},
        optional(
            loose,
            secondary_keys=st.lists(keys, max_size=4),
            selective=st.booleans(),
            constant=st.booleans(),
            enabled=st.booleans(),
            use_regex=st.booleans(),
            case_sensitive=st.booleans(),
            insertion_order=numbers,
            priority=numbers,
            position=st.sampled_from(["before_char", "after_char"] + ["at_depth"] * loose),
            name=text,
            id=st.one_of(numbers, text),
            extensions=MATCH_OPTIONS,
        ),
    )
    book = merged(
        {"entries": st.lists(entry, max_size=6)},
        optional(
            loose,
            scan_depth=st.integers(-2 * loose, 10**6),
            token_budget=st.integers(-2 * loose, 10**6),
            recursive_scanning=st.booleans(),
            name=text,
            extensions=MATCH_OPTIONS,
        ),
    )
    return entry, book


SURROGATES = ("\ud800", "\udfff", "\ud83d")
clean_text = st.one_of(  # no lone surrogates: JSON carries them, but every text field of a card refuses them
    st.text(max_size=30),
    st.lists(st.sampled_from([p for p in ODD_PIECES if p not in SURROGATES]), max_size=12).map("".join),
)
entries, books = book_strategies(True, odd_text)
typed_books = book_strategies(False, clean_text)[1]
world_info = st.builds(
    lambda es: {"entries": {str(i): e for i, e in enumerate(es)}},
    st.lists(
        optional(
            True,
            key=st.lists(keys, max_size=4),
            keysecondary=st.lists(keys, max_size=3),
            content=content,
            constant=st.booleans(),
            selective=st.booleans(),
            order=numbers,
            disable=st.booleans(),
            position=st.integers(-1, 7),
            uid=numbers,
            caseSensitive=st.booleans(),
            matchWholeWords=st.booleans(),
        ),
        max_size=6,
    ),
)
names = st.one_of(
    odd_text,
    st.text(st.characters(codec="ascii"), min_size=1, max_size=300),
    st.integers(250, 70_000).map(lambda n: "N" * n),
)
good_names = st.one_of(st.text(min_size=1, max_size=256).filter(str.strip), st.integers(1, 256).map(lambda n: "N" * n))


def card_data_strategy(loose: bool) -> st.SearchStrategy:
    """A card's data: ``loose`` any JSON in any field; else the spec's types (hostile texts, names, lorebooks and
    extensions, lone surrogates only where the spec keeps free-form JSON)."""
    text = odd_text if loose else clean_text
    body = st.one_of(text, decorated, st.integers(0, 8000).map(lambda n: "{{char}}" * n))
    fields = optional(
        loose,
        description=body,
        personality=body,
        scenario=body,
        first_mes=body,
        mes_example=body,
        system_prompt=body,
        post_history_instructions=body,
        creator_notes=text,
        alternate_greetings=st.lists(body, max_size=3),
        tags=st.lists(text, max_size=3),
        character_book=books if loose else typed_books,
        extensions=st.one_of(
            trees,
            st.dictionaries(json_keys, trees, max_size=4),  # free-form: kept as it came, odd Unicode included
            st.fixed_dictionaries(
                {},
                optional={
                    "rp_ray": st.fixed_dictionaries(
                        {}, optional={"adapter": st.one_of(st.none(), odd_text), "sampling": trees}
                    ),
                    "depth_prompt": st.fixed_dictionaries(
                        {},
                        optional={"prompt": body, "depth": numbers, "role": st.sampled_from(["system", "user", "x"])},
                    ),
                    "fuzz": deep,
                },
            ),
        ),
        assets=st.lists(optional(loose, type=text, uri=odd_text, name=text, ext=text), max_size=3),
        creator_notes_multilingual=st.dictionaries(text, text, max_size=3),
        creation_date=numbers,
        group_only_greetings=st.lists(body, max_size=3),
    )
    return (
        merged({"name": names if loose else good_names}, fields)
        if not loose
        else optional(True, name=names).flatmap(lambda head: fields.map(lambda rest: {**head, **rest}))
    )


typed_cards = st.builds(
    lambda spec, data: {"spec": spec[0], "spec_version": spec[1], "data": data},
    st.sampled_from([("chara_card_v2", "2.0"), ("chara_card_v3", "3.0"), ("chara_card_v3", "3.7")]),
    card_data_strategy(False),
)
cards = st.one_of(
    st.builds(
        lambda spec, version, data: {"spec": spec, "spec_version": version, "data": data},
        st.sampled_from(["chara_card_v2", "chara_card_v3", "chara_card_v1", "lorebook_v3", "x"]),
        st.sampled_from(["2.0", "3.0", "3.1", "3." + "9" * 5000, "3.0\n", 3.0, None]),
        card_data_strategy(True),
    ),
    card_data_strategy(True),  # V1: the fields at the top
    typed_cards,
    typed_cards,  # twice: most cards get past the checks, so imports and prompts run on them
)


V2_HEAD = b'{"spec":"chara_card_v2","spec_version":"2.0","data":'


def to_json_bytes(obj: Any, ascii_only: bool) -> bytes:
    """The JSON an uploader would send: surrogates escaped as \\udXXX, or written raw (invalid UTF-8)."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_bytes = st.one_of(
    st.builds(to_json_bytes, st.one_of(cards, trees, deep), st.booleans()),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 20_000).map(lambda n: V2_HEAD + b'{"name":' + b"9" * n + b"}}"),
    st.binary(max_size=200),
    st.builds(lambda b: b"\xef\xbb\xbf" + b, st.binary(max_size=50)),
)

# -- PNG chunk sequences ---------------------------------------------------------------------------------------

BASE_PNG = png.read_chunks(png.placeholder_png(2, 2))
# compressed once here: 64 MiB inflated from ~64 KiB, a card chunk's text far past any limit
BOMB = zlib.compress(b"A" * (64 << 20), 9)


def b64_json(obj: Any) -> bytes:
    return base64.b64encode(json.dumps(obj).encode())


text_payloads = st.one_of(
    st.builds(b64_json, cards),
    st.binary(max_size=100),
    st.sampled_from([b"", b"!!!", b"A" * 1001, b"e30=", base64.b64encode(b"[" * 5000)]),
)
card_keywords = st.one_of(st.sampled_from([b"ccv3", b"chara", b"Comment", b""]), st.binary(max_size=80))
text_chunks = st.one_of(
    st.builds(lambda k, p: png.Chunk(b"tEXt", k + b"\0" + p), card_keywords, text_payloads),
    st.builds(
        lambda k, p, method: png.Chunk(b"zTXt", k + b"\0" + method + p),
        card_keywords,
        st.one_of(text_payloads.map(zlib.compress), st.just(BOMB), st.binary(max_size=40)),
        st.sampled_from([b"\0", b"\1", b""]),
    ),
    st.builds(
        lambda k, flag, p, tail: png.Chunk(b"iTXt", k + b"\0" + flag + b"\0" + tail + p),
        card_keywords,
        st.sampled_from([b"\0", b"\1"]),
        st.one_of(text_payloads, text_payloads.map(zlib.compress), st.just(BOMB)),
        st.sampled_from([b"en\0\0", b"\0\0", b"", b"\0"]),
    ),
)
chunks = st.one_of(
    text_chunks,
    text_chunks,
    st.builds(png.Chunk, st.sampled_from([b"IHDR", b"IDAT", b"IEND", b"tEXt", b"zTXt"]), st.binary(max_size=40)),
    st.builds(png.Chunk, st.binary(min_size=4, max_size=4), st.binary(max_size=40)),
)


def assemble(middle: list[png.Chunk], frame: bool, damage: int | None, cut: int | None, copies: int) -> bytes:
    """A PNG of ``middle`` (``copies`` times: many chunks, each a bomb), framed by IHDR/IDAT .. IEND or not, one
    byte flipped at ``damage`` and cut at ``cut`` (fractions of the length in 1/1000)."""
    seq = [*BASE_PNG[:-1], *middle * copies, BASE_PNG[-1]] if frame else middle * copies
    data = bytearray(png.SIGNATURE + b"".join(c.encode() for c in seq))
    if damage is not None and len(data) > 8:
        i = 8 + damage * (len(data) - 9) // 1000
        data[i] ^= 0x5A
    if cut is not None:
        data = data[: 8 + cut * (len(data) - 8) // 1000]
    return bytes(data)


pngs = st.builds(
    assemble,
    st.lists(chunks, max_size=6),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 1000)),
    st.one_of(st.none(), st.none(), st.integers(0, 1000)),
    st.sampled_from([1, 1, 1, 50]),
)

# -- dataset files ---------------------------------------------------------------------------------------------

ATTR = load_registry(REPO / "data")["haruhi_train"]  # sharegpt: conversations of from/value, user/assistant/system
ROLES = ["system", "user", "assistant", "observation", "function_call", "human", "gpt", ""]
messages = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": odd_text}),
    st.fixed_dictionaries({}, optional={"from": trees, "value": trees}),
)
rows = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(messages, max_size=6)}, optional={"system": trees}),
    trees,
    deep,
)
row_texts = st.one_of(
    st.builds(to_json_bytes, rows, st.booleans()),
    st.binary(max_size=60),
    st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(4290, 6000).map(lambda n: b'{"conversations": ' + b"7" * n + b"}"),
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\n", b"\r\n", b",", b"]", b"[", b'"\\ud800"', b"NaN", b"1e999"]),
)


def file_bytes(items: list[bytes], layout: str, tail: bytes) -> bytes:
    body = b"[" + b",\n".join(items) + b"]" if layout == "array" else b"\n".join(items)
    return body + tail


dataset_files = st.builds(
    lambda items, layout, tail, suffix: (file_bytes(items, layout, tail), suffix),
    st.lists(row_texts, max_size=8),
    st.sampled_from(["array", "lines"]),
    st.sampled_from([b"", b"\n", b"]", b",", b"\xff", b"\xef\xbb\xbf"]),
    st.sampled_from([".json", ".jsonl", ".json.xz", ".jsonl.xz"]),
)

# -- the targets -----------------------------------------------------------------------------------------------


def serve_config(registry: Path) -> ServeConfig:
    return ServeConfig(model={"path": "unused", "template": "llama3"}, card_registry=str(registry), adapters={})


def import_and_prompt(raw: bytes, chat: list[str]) -> None:
    """What the server does with an upload: import it into a fresh registry (``Catalog.import_card``), then list
    it and build a chat prompt for it."""
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(serve_config(Path(tmp)))
        character = bounded((CardError,), catalog.import_card, raw, None, "fuzz")
        if character is None:
            return
        bounded((), character.entry)
        turns = [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(chat)]
        # check_macros' ValueError (a 400 in the server) is the one refusal a prompt may give
        bounded((ValueError,), character.prompt, turns, len, 1 << 20)


@FUZZ
@given(cards, st.lists(odd_text, min_size=1, max_size=3), st.booleans())
def _card_json(obj, chat, ascii_only):
    bounded((CardError,), card_from_dict, obj, "fuzz")
    import_and_prompt(to_json_bytes(obj, ascii_only), chat)


@FUZZ
@given(json_bytes)
def _card_bytes(raw):
    import_and_prompt(raw, ["{{char}} a"])


@FUZZ
@given(pngs)
def _card_png(raw):
    bounded((png.PngError,), png.find_text, raw, ("ccv3", "chara"), 4 << 20)
    bounded((CardError,), parse_card, raw, "fuzz.png")
    import_and_prompt(raw, ["hi"])


chat_texts = st.one_of(odd_text, st.integers(0, 10_000).map(lambda n: "a" * n + "!"), keys)


@FUZZ
@given(st.one_of(books, world_info, trees), st.lists(chat_texts, max_size=4))
def _lorebook(obj, chat):
    book = bounded((CardError,), lorebook_from_dict, obj, "fuzz")
    if book is not None:
        bounded((), activate, book, chat, len)
        bounded((), activate, book, chat, len, default_scan_depth=10)


@FUZZ
@given(keys, chat_texts, st.booleans(), st.booleans())
def _key_matching(key, text, case_sensitive, whole_words):
    bounded((), key_matches, key, text, case_sensitive=case_sensitive, whole_words=whole_words)


def _read_and_validate(path: Path, max_row_bytes: int) -> None:
    for row in read_rows(path, max_row_bytes):
        assert row.drop is None or row.drop in DROP_REASONS, row
        if row.drop is None:
            try:
                to_conversation(row.value, ATTR)
            except Dropped as e:
                assert e.reason in DROP_REASONS


@FUZZ
@given(dataset_files, st.sampled_from([64, 4096, 1 << 20]), st.booleans())
def _dataset(file, max_row_bytes, damage_xz):
    data, suffix = file
    if suffix.endswith(".xz"):
        data = lzma.compress(data)
        if damage_xz:
            data = data[: len(data) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        path.write_bytes(data)
        bounded((DataFileError,), _read_and_validate, path, max_row_bytes)


@pytest.mark.parametrize(
    "target", [_card_json, _card_bytes, _card_png, _lorebook, _key_matching, _dataset], ids=lambda t: t.__name__[1:]
)
def test_fuzz(target):
    run_fuzz(target)


def test_the_harness_catches_what_it_should():
    """A foreign error, a slow call and a large allocation each fail ``bounded``; the project's error passes."""
    assert bounded((CardError,), card_from_dict, [], "x") is None
    with pytest.raises(UnicodeEncodeError):
        bounded((ValueError,), "\ud800".encode, "utf-8")
    with pytest.raises(AssertionError, match="took"):
        bounded((), time.sleep, TIME_LIMIT_S + 0.2)
    with pytest.raises(AssertionError, match="peak"):
        bounded((), bytearray, MEMORY_LIMIT + (1 << 20))
