"""Lorebook activation: scan window, constant / selective / case-sensitive / regex / disabled entries, recursion,
decorators and the token budget; keys matched as SillyTavern 1.12.6 matches them, regexes on RE2; the limits on
books, entries and keys; standalone lorebook files (character_book shape, lorebook_v3, SillyTavern)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rp_ray.character.card import MAX_BOOK_ENTRIES, BookEntry, CardError, Lorebook, parse_card, read_card_file
from rp_ray.character.keys import MAX_ENTRY_KEYS, MAX_KEY_CHARS, key_matches, parse_decorators
from rp_ray.character.lorebook import MAX_RECURSION_ROUNDS, activate, entry_text, load_lorebook_file

FIXTURES = Path(__file__).parent / "fixtures" / "cards"


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def book() -> Lorebook:
    return read_card_file(FIXTURES / "v3_lorebook.json").book


def ids(entries: list[BookEntry]) -> list:
    return [e.id for e in entries]


def test_scripted_conversation_inserts_exactly_these_entries(book):
    """Budget 40 words: constant world (8) + Ark (10) + noodles (9) + sword (10) = 37 fit; the Tower (19 words,
    lowest priority, reached only by recursion from the Ark entry's content) is cut by the budget."""
    chat = [
        "Long ago there was a sword duel.",  # outside scan_depth 2
        "I need this box taken to the Ark before the fight starts.",
        "Fine, but first ramen. And keep your sword dry.",
    ]
    inserted = activate(book, chat, words)
    assert ids(inserted) == [1, 3, 6, 2]  # insertion_order 5, 10, 15, 20
    assert [e.position for e in inserted] == ["before_char", "before_char", "after_char", "after_char"]
    assert sum(words(entry_text(e)) for e in inserted) == 37
    # the same chat with room for everything: recursion brings in the Tower (insertion_order 30, last)
    roomy = book.model_copy(update={"token_budget": 1000})
    assert ids(activate(roomy, chat, words)) == [1, 3, 6, 2, 4]
    # without recursive scanning the Tower is never reached
    flat = roomy.model_copy(update={"recursive_scanning": False})
    assert ids(activate(flat, chat, words)) == [1, 3, 6, 2]


def test_scan_window_case_selective_and_disabled(book):
    big = book.model_copy(update={"token_budget": 1000})
    # only the constant entry: the keys sit outside the 2-message window
    assert ids(activate(big, ["the Ark, a sword fight, ramen", "hello", "how are you"], words)) == [1]
    # case-sensitive key: "ark" does not trigger "Ark"
    assert ids(activate(big, ["meet me at the ark"], words)) == [1]
    # selective: "sword" alone is not enough, "sword" + "duel" is; the disabled entry (also keyed sword/rain) never
    assert ids(activate(big, ["my sword, in the rain"], words)) == [1]
    assert ids(activate(big, ["my SWORD for the Duel"], words)) == [1, 2]
    # the V3 decorator adds a key; the regex key is case-insensitive by its /i flag and matches whole words only
    assert ids(activate(big, ["any NOODLES left?"], words)) == [1, 6]
    assert ids(activate(big, ["UDON please"], words)) == [1, 6]
    assert ids(activate(big, ["ramenesque"], words)) == [1]
    # scan_depth 0: nothing is scanned, constant entries still come in
    assert ids(activate(big.model_copy(update={"scan_depth": 0}), ["the Ark"], words)) == [1]


def test_budget_ranks_constant_then_priority_then_order():
    entries = [
        BookEntry(keys=["a"], content="low priority early", insertion_order=1, priority=1, id="low"),
        BookEntry(keys=["a"], content="high priority late", insertion_order=9, priority=9, id="high"),
        BookEntry(keys=[], content="constant", constant=True, insertion_order=5, priority=0, id="const"),
        BookEntry(keys=["a"], content="same priority lower order", insertion_order=3, priority=9, id="high-early"),
    ]
    book = Lorebook(entries=entries, token_budget=3)
    # ranked: const (1 word), high-early (4 words, over the running budget -> stops the list)
    assert ids(activate(book, ["a"], words)) == ["const"]
    book = Lorebook(entries=entries, token_budget=8)
    # const (1) + high-early (4) = 5, then high (3) = 8, then low would be 11 > 8
    assert ids(activate(book, ["a"], words)) == ["high-early", "const", "high"]  # returned by insertion_order
    # absent budget and depth fall back to the defaults (2048 tokens, 2 messages)
    assert ids(activate(Lorebook(entries=entries), ["a", "x", "y"], words)) == ["const"]
    assert len(activate(Lorebook(entries=entries), ["a", "x"], words)) == 4


def test_key_matching_rules():
    assert key_matches("Sword", "a sword!")
    assert not key_matches("Sword", "a sword!", case_sensitive=True)
    assert key_matches("  sword\t", "a sword!")  # keys are trimmed, as SillyTavern trims them
    assert key_matches("/^hi$/m", "x\nhi\ny")
    assert not key_matches("/^hi$/", "x\nhi\ny")
    assert key_matches("/a.b/s", "a\nb") and not key_matches("/a.b/", "a\nb")
    assert key_matches("/ga?te/i", "GATE") and not key_matches("/ga?te/", "GATE")  # the regex alone decides
    assert not key_matches("/[unclosed/", "[unclosed")  # RE2 refuses it: never matches (reading a card refuses it)
    assert not key_matches("   ", "anything")
    # not /pattern/flags as a whole (an unescaped slash inside, repeated or unknown flags): plain text
    assert key_matches("/a/b/", "see /a/b/ here") and not key_matches("/a/b/", "a/b")
    assert key_matches("/x/ii", "/X/II") and not key_matches("/x/ii", "x")
    assert key_matches("/x/x", "/x/x") and not key_matches("/x/x", "x")
    assert key_matches("/a\\/b/", "a/b")  # an escaped slash is part of the pattern
    # JavaScript's toLowerCase, not casefold: "ß" stays "ß"
    assert not key_matches("Straße", "STRASSE") and key_matches("STRASSE", "strasse")
    deco = parse_decorators("@@scan_depth 5\n@@exclude_keys foo, bar\n@@@fallback x\n@@depth 4\nReal text\n@@ kept")
    assert deco.scan_depth == 5 and deco.exclude_keys == ("foo", "bar")
    assert deco.text == "Real text\n@@ kept" and deco.ignored == ("fallback", "depth")


def test_use_regex_does_not_make_plain_keys_regexes():
    """SillyTavern's export marks every entry use_regex, and it matches such keys as plain text: so does rp_ray."""
    book = Lorebook(
        entries=[
            BookEntry(keys=["C++"], content="cpp", use_regex=True, id="cpp"),
            BookEntry(keys=["*sigh*"], content="sigh", use_regex=True, id="sigh"),
            BookEntry(keys=["/ga?te/i"], content="gate", use_regex=False, id="gate"),
        ]
    )
    assert ids(activate(book, ["Can you open the gate?"], words)) == ["gate"]
    assert ids(activate(book, ["I write C++ all day"], words)) == ["cpp"]
    assert ids(activate(book, ["*sigh* fine"], words)) == ["sigh"]
    assert ids(activate(book, ["THE GATE"], words)) == ["gate"]


def test_whole_words_and_case_as_sillytavern_sets_them():
    """match_whole_words and case_sensitive from the entry (its own field, or its extensions as SillyTavern's export
    writes them), else the book's extensions, else off."""
    whole = {"match_whole_words": True}
    assert key_matches("gate", "the gateway") and not key_matches("gate", "the gateway", whole_words=True)
    assert key_matches("gate", "the GATE.", whole_words=True) and key_matches("gate", "gate", whole_words=True)
    assert key_matches("gate", "门gate门", whole_words=True)  # non-ASCII letters are non-word characters there
    assert not key_matches("gate", "gate_keeper", whole_words=True) and not key_matches(
        "gate", "gate2", whole_words=True
    )
    assert key_matches("*sigh*", "*sigh* fine", whole_words=True)
    assert not key_matches("*sigh*", "x*sigh*", whole_words=True)
    # a key of several words counts by plain containment
    assert key_matches("open the", "reopen thesis", whole_words=True)
    assert not key_matches("Gate", "the gate", whole_words=True, case_sensitive=True)

    entries = [
        BookEntry(keys=["gate"], content="g", id="plain"),
        BookEntry(keys=["gate"], content="w", extensions=whole, id="whole"),
        BookEntry(keys=["Gate"], content="c", extensions={"case_sensitive": True}, id="case"),
        BookEntry(keys=["Gate"], content="o", case_sensitive=False, extensions={"case_sensitive": True}, id="own"),
    ]
    book = Lorebook(entries=entries)
    assert ids(activate(book, ["the gateway"], words)) == ["plain", "own"]
    assert ids(activate(book, ["the gate"], words)) == ["plain", "whole", "own"]
    assert ids(activate(book, ["the Gate"], words)) == ["plain", "whole", "case", "own"]
    # the book's defaults (case-sensitive, whole words) apply where an entry sets nothing
    strict = Lorebook(entries=entries, extensions={"case_sensitive": True, "match_whole_words": True})
    assert ids(activate(strict, ["the gateway"], words)) == []
    assert ids(activate(strict, ["the gate"], words)) == ["plain", "whole", "own"]
    assert ids(activate(strict, ["the Gate"], words)) == ["case", "own"]
    off = BookEntry(keys=["Gate"], content="x", extensions={"case_sensitive": False, "match_whole_words": False}, id=0)
    assert ids(activate(strict.model_copy(update={"entries": [off]}), ["gateway"], words)) == [0]


def _card(*entries: dict, **book) -> bytes:
    data = {"name": "X", "character_book": {"entries": list(entries), **book}}
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}).encode()


def test_regex_keys_run_in_linear_time():
    """A key that backtracking engines take exponential time on imports and scans in well under 0.1 s."""
    card = parse_card(_card({"keys": ["/^(a+)+$/"], "content": "aaa", "id": "evil"}), "evil.json")
    start = time.perf_counter()
    inserted = activate(card.book, ["a" * 40 + "b"], words)
    elapsed = time.perf_counter() - start
    assert inserted == [] and elapsed < 0.1, elapsed
    assert ids(activate(card.book, ["a" * 40], words)) == ["evil"]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"keys": ["sword", "/(a)\\1/"], "name": "echo"}, "entries[0]: keys[1] '/(a)\\\\1/' in entry 'echo': RE2"),
        ({"keys": ["x"], "secondary_keys": ["/(?=a)/"]}, "entries[0]: secondary_keys[0] '/(?=a)/': RE2"),
        ({"keys": ["x"], "content": "@@exclude_keys /(?<=a)b/\ntext"}, "@@exclude_keys '/(?<=a)b/': RE2"),
    ],
)
def test_a_key_re2_refuses_is_an_import_error(tmp_path, entry, fragment):
    with pytest.raises(CardError) as info:
        parse_card(_card(entry), "refused.json")
    message = str(info.value)
    assert message.startswith("refused.json: field data.character_book.entries[0]") and fragment in message, message
    assert "drop the surrounding slashes" in message
    path = tmp_path / "lore.json"
    path.write_text(json.dumps({"entries": [entry]}), encoding="utf-8")
    with pytest.raises(CardError, match=r"lore.json: field entries\[0\]: .*RE2"):
        load_lorebook_file(path)


def _keys(n: int) -> dict:
    return {"keys": [f"k{i}" for i in range(n - 1)], "secondary_keys": ["s"]}


@pytest.mark.parametrize(
    ("at_limit", "over", "fragment"),
    [
        (
            [{"keys": ["k"]}] * MAX_BOOK_ENTRIES,
            [{"keys": ["k"]}] * (MAX_BOOK_ENTRIES + 1),
            f"field data.character_book.entries: {MAX_BOOK_ENTRIES + 1} entries, over the limit of "
            f"{MAX_BOOK_ENTRIES} per lorebook; remove or merge entries",
        ),
        (
            [_keys(MAX_ENTRY_KEYS)],
            [_keys(MAX_ENTRY_KEYS + 1)],
            f"entries[0]: {MAX_ENTRY_KEYS + 1} keys (keys, secondary_keys and @@additional_keys / @@exclude_keys "
            f"together), over the limit of {MAX_ENTRY_KEYS} per entry; merge keys into one regex key",
        ),
        (
            [{"keys": ["k"], "content": "@@additional_keys " + ",".join(map(str, range(MAX_ENTRY_KEYS - 1)))}],
            [{"keys": ["k"], "content": "@@additional_keys " + ",".join(map(str, range(MAX_ENTRY_KEYS)))}],
            f"entries[0]: {MAX_ENTRY_KEYS + 1} keys",
        ),
        (
            [{"keys": ["k", "x" * MAX_KEY_CHARS]}],
            [{"keys": ["k", "x" * (MAX_KEY_CHARS + 1)]}],
            f"entries[0]: keys[1]: a key of {MAX_KEY_CHARS + 1} characters, over the limit of {MAX_KEY_CHARS}; "
            f"shorten it",
        ),
    ],
)
def test_book_entry_and_key_limits(at_limit, over, fragment):
    assert parse_card(_card(*at_limit), "ok.json").book is not None
    with pytest.raises(CardError) as info:
        parse_card(_card(*over), "big.json")
    assert str(info.value).startswith("big.json: ") and fragment in str(info.value), str(info.value)


def test_recursion_is_capped_and_quick():
    """400 entries each keyed by the previous one's content: the chain stops after the round limit, quickly."""
    n = 400
    entries = [BookEntry(keys=[f"link{i}"], content=f"link{i + 1} " + "lore " * 20, id=i) for i in range(n)]
    book = Lorebook(entries=entries, recursive_scanning=True, token_budget=10**9)
    start = time.perf_counter()
    inserted = activate(book, ["start at link0"], words)
    elapsed = time.perf_counter() - start
    assert ids(inserted) == list(range(MAX_RECURSION_ROUNDS + 1)) and elapsed < 0.5, elapsed
    # the lore an entry is reached through is the text of entries activated in earlier rounds
    two = Lorebook(entries=entries[:3], recursive_scanning=True)
    assert ids(activate(two, ["link1"], words)) == [1, 2]


@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, "-1", "4x", ""])
def test_a_scan_depth_that_is_not_a_plain_number_is_ignored(value):
    card = parse_card(_card({"keys": ["k"], "content": f"@@scan_depth {value}\ntext", "id": 1}), "odd.json")
    assert parse_decorators(card.book.entries[0].content).scan_depth is None
    assert ids(activate(card.book, ["k", "x"], words)) == [1]  # the book's window of 2 messages
    assert ids(activate(card.book, ["k", "x", "y"], words)) == []


def test_world_info_keys_and_whole_words(tmp_path):
    """A world-info entry keyed "²" (digit to isdigit, not to int) keeps it as its id; matchWholeWords carries over."""
    wi = {"entries": {"²": {"key": ["gate"], "content": "c", "matchWholeWords": True}, "7": {"key": ["x"]}}}
    path = tmp_path / "wi.json"
    path.write_text(json.dumps(wi), encoding="utf-8")
    book = load_lorebook_file(path)
    assert [e.id for e in book.entries] == ["²", 7]
    assert book.entries[0].extensions == {"sillytavern": {}, "match_whole_words": True}
    assert ids(activate(book, ["the gateway"], words)) == []
    assert ids(activate(book, ["the gate"], words)) == ["²"]


def test_decorators_activate_exclude_and_own_scan_depth():
    entries = [
        BookEntry(keys=[], content="@@activate\nalways", id="always"),
        BookEntry(keys=["x"], content="@@dont_activate\nnever", constant=True, id="never"),
        BookEntry(keys=["cat"], content="@@exclude_keys dog\ncats", id="cat"),
        BookEntry(keys=["old"], content="@@scan_depth 5\nlong memory", id="deep"),
    ]
    book = Lorebook(entries=entries)
    assert ids(activate(book, ["old", "a", "cat"], words)) == ["always", "cat", "deep"]
    assert ids(activate(book, ["old", "a", "cat and dog"], words)) == ["always", "deep"]
    assert entry_text(entries[0]) == "always"


def test_sillytavern_world_info_file():
    book = load_lorebook_file(FIXTURES / "world_info.json")
    assert book.name == "Harbour" and [e.id for e in book.entries] == [0, 1, 2, 3]
    ship = book.entries[1]
    assert ship.keys == ["ship", "boat"] and ship.secondary_keys == ["storm"] and ship.selective
    assert ship.insertion_order == 50 and ship.position == "after_char" and ship.comment == "wreck"
    assert book.entries[0].extensions == {"sillytavern": {"depth": 4, "probability": 100}}
    assert not book.entries[3].enabled and book.entries[2].constant
    assert ids(activate(book, ["the tavern by the ship"], words)) == [2, 0]
    assert ids(activate(book, ["a boat in the storm", "then the tavern"], words)) == [2, 1, 0]


def test_character_book_shaped_and_v3_files(tmp_path):
    card = json.loads((FIXTURES / "v3_lorebook.json").read_text(encoding="utf-8"))
    plain = tmp_path / "book.json"
    plain.write_text(json.dumps(card["data"]["character_book"]), encoding="utf-8")
    v3 = tmp_path / "book_v3.json"
    v3.write_text(json.dumps({"spec": "lorebook_v3", "data": card["data"]["character_book"]}), encoding="utf-8")
    assert load_lorebook_file(plain) == load_lorebook_file(v3) == read_card_file(FIXTURES / "v3_lorebook.json").book


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"name": "no entries"}', "not a lorebook"),
        ('{"entries": [{"keys": ["a"], "insertion_order": "first"}]}', "field entries[0].insertion_order"),
        ('{"entries": [', "not valid JSON"),
        ('{"entries": {"0": "text"}}', "field entries.0"),
    ],
)
def test_bad_lorebook_files(tmp_path, content, fragment):
    path = tmp_path / "lore.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CardError) as info:
        load_lorebook_file(path)
    assert "lore.json" in str(info.value) and fragment in str(info.value), str(info.value)
