"""Lorebook activation: scan window, constant / selective / case-sensitive / regex / disabled entries, recursion,
decorators and the token budget; standalone lorebook files (character_book shape, lorebook_v3, SillyTavern)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rp_ray.character.card import BookEntry, CardError, Lorebook, read_card_file
from rp_ray.character.lorebook import activate, entry_text, key_matches, load_lorebook_file, parse_decorators

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
    assert key_matches("sw.rd", "a SWORD", regex=True)
    assert not key_matches("sw.rd", "a SWORD", regex=True, case_sensitive=True)
    assert key_matches("/^hi$/m", "x\nhi\ny")
    assert not key_matches("/[unclosed/", "[unclosed")  # a broken regex never matches (logged)
    assert not key_matches("   ", "anything")
    deco = parse_decorators("@@scan_depth 5\n@@exclude_keys foo, bar\n@@@fallback x\n@@depth 4\nReal text\n@@ kept")
    assert deco.scan_depth == 5 and deco.exclude_keys == ("foo", "bar")
    assert deco.text == "Real text\n@@ kept" and deco.ignored == ("fallback", "depth")


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
