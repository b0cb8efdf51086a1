"""Character cards: V1/V2/V3 JSON and PNG in, the same card out (JSON equal, extensions byte for byte), the
registry and its adapter binding, prompt assembly, every malformed file a clear ``CardError`` (PNG text bombs
included), and the CLI."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from PIL import Image, PngImagePlugin

from rp_ray.character import card as cardmod
from rp_ray.character import png
from rp_ray.character.card import CardError, CardRegistry, card_to_json, parse_card, read_card_file, write_card_png
from rp_ray.character.lorebook import activate
from rp_ray.character.prompt import build_messages, greetings, system_prompt
from rp_ray.character.scenes import join_system_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
V3 = FIXTURES / "v3_lorebook.json"
V2 = FIXTURES / "v2_card.json"
V1 = FIXTURES / "v1_card.json"
V1_TAVERN = FIXTURES / "v1_tavern_card.json"  # the shape the PyPI tavern-card package writes V1 cards in


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def b64(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def pillow_png(texts: dict[str, str], size=(8, 6), colour=(10, 120, 200), ztxt: bool = False) -> bytes:
    """A PNG written by Pillow (independent of our writer), with text chunks through PngInfo."""
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v, zip=ztxt)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def chunk_texts(path: Path) -> dict[str, dict]:
    """The card chunks of a PNG as Pillow reads them, decoded."""
    with Image.open(path) as im:
        im.load()
        return {k: json.loads(base64.b64decode(v)) for k, v in im.text.items() if k in ("chara", "ccv3")}


# -- round trips ---------------------------------------------------------------------------------------------------


def test_v3_json_round_trip_through_the_registry_is_exact(tmp_path):
    original = load(V3)
    reg = CardRegistry(tmp_path / "reg")
    name = reg.import_file(V3)
    assert name == "aoi-kurosawa" and reg.names() == [name]
    stored = load(reg.path(name))
    assert stored == original
    out = reg.export(name, tmp_path / "out.json", "json")
    exported = load(out)
    assert exported == original
    # extensions byte for byte under the same serialisation (key order, floats 1.0 / 1e-7 / -0.0, unicode, big ints)
    for ext in (original["data"]["extensions"], original["data"]["character_book"]["extensions"]):
        assert dumps(ext) in dumps(exported["data"])
    assert dumps(exported["data"]["extensions"]) == dumps(original["data"]["extensions"])
    assert list(exported["data"]) == list(original["data"])  # key order of data kept too
    assert exported["data"]["character_book"]["entries"][5]["x_unknown_entry_field"] == {"kept": [1, 2.5]}
    card = reg.get(name)
    assert card.version == 3 and card.data.nickname == "Aoi" and card.data.assets[0].uri == "ccdefault:"
    assert card.data.model_extra == {"x_unknown_data_field": {"z": 1, "a": [True, None]}}


def test_v3_png_round_trip_gives_the_same_card_and_both_chunks(tmp_path):
    original = load(V3)
    reg = CardRegistry(tmp_path / "reg")
    name = reg.import_file(V3)
    out = reg.export(name, tmp_path / "aoi.png", "png")
    assert card_to_json(read_card_file(out)) == original
    assert dumps(card_to_json(read_card_file(out))["data"]["extensions"]) == dumps(original["data"]["extensions"])
    chunks = chunk_texts(out)  # Pillow reads our PNG: both chunks, valid image
    assert chunks["ccv3"] == original
    v2 = chunks["chara"]
    assert v2["spec"] == "chara_card_v2" and v2["spec_version"] == "2.0"
    assert not set(cardmod.V3_ONLY_FIELDS) & set(v2["data"])
    assert v2["data"]["extensions"] == original["data"]["extensions"]
    assert v2["data"]["character_book"] == original["data"]["character_book"]
    with Image.open(out) as im:
        im.verify()
    # importing the exported PNG again gives an equal card
    again = reg.import_file(out, name="aoi-again")
    assert card_to_json(reg.get(again)) == original


def test_v2_png_keeps_v2_in_chara_and_promotes_ccv3(tmp_path):
    original = load(V2)
    card = read_card_file(V2)
    assert card_to_json(card) == original  # top-level V1 duplicates kept as they came
    out = write_card_png(card, tmp_path / "haruhi.png")
    chunks = chunk_texts(out)
    assert chunks["chara"] == original
    back = read_card_file(out)  # ccv3 is read first
    assert back.version == 3
    assert card_to_json(back)["data"] == {**original["data"], "group_only_greetings": []}
    assert cardmod.card_to_v2_json(back)["data"] == original["data"]


def test_pillow_png_card_reads_and_keeps_its_image(tmp_path):
    """A card PNG made by another writer (Pillow's PngInfo, tEXt and zTXt); exporting keeps its pixels."""
    v2 = load(V2)
    for ztxt in (False, True):
        src = tmp_path / f"pillow-{ztxt}.png"
        src.write_bytes(pillow_png({"Title": "x", "chara": b64(v2)}, ztxt=ztxt))
        assert card_to_json(read_card_file(src)) == v2
    reg = CardRegistry(tmp_path / "reg")
    name = reg.import_file(src)
    out = reg.export(name, tmp_path / "out.png", "png")
    with Image.open(out) as im, Image.open(src) as orig:
        assert im.size == orig.size == (8, 6) and im.getpixel((3, 3)) == (10, 120, 200)
        assert im.text["Title"] == "x"
    # an iTXt chunk (UTF-8) is read as well
    info = PngImagePlugin.PngInfo()
    info.add_itxt("chara", b64(v2), zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG", pnginfo=info)
    assert card_to_json(parse_card(buf.getvalue(), "itxt.png")) == v2


def test_ccv3_is_read_before_chara(tmp_path):
    v3 = load(V3)
    v2 = load(V2)
    data = pillow_png({"chara": b64(v2), "ccv3": b64(v3)})
    assert parse_card(data, "both.png").name == "Aoi Kurosawa"
    # our writer replaces old card chunks instead of adding a second pair
    rewritten = cardmod.card_png_bytes(read_card_file(V2), data)
    keys = [png.chunk_keyword(c) for c in png.read_chunks(rewritten) if c.type in png.TEXT_TYPES]
    assert sorted(keys) == ["ccv3", "chara"]
    assert parse_card(rewritten, "x.png").name == "Haruhi"


def test_v1_card_is_upgraded_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="rp_ray.character.card"):
        card = read_card_file(V1)
    assert "V1 card" in caplog.text and "upgraded to chara_card_v2" in caplog.text
    raw = card_to_json(card)
    assert raw["spec"] == "chara_card_v2" and raw["spec_version"] == "2.0"
    assert raw["data"]["name"] == "Old Bob" and raw["data"]["avatar"] == "none"  # unknown V1 keys kept
    assert greetings(card, "Kyon") == ["Evening, Kyon. I'm Old Bob."]


def test_v1_card_under_data_with_spec_v1_is_upgraded(tmp_path, caplog):
    """``{"spec": "chara_card_v1", "data": {...}}`` (tavern-card's V1) reads as its flat V1 twin does, from JSON and
    from a PNG."""
    original = load(V1_TAVERN)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(original["data"]), encoding="utf-8")
    image = tmp_path / "mira.png"
    image.write_bytes(pillow_png({"chara": b64(original)}))
    with caplog.at_level(logging.INFO, logger="rp_ray.character.card"):
        cards = [read_card_file(p) for p in (V1_TAVERN, image, flat)]
    assert caplog.text.count("V1 card upgraded to chara_card_v2") == 3
    raw = card_to_json(cards[0])
    assert raw["spec"] == "chara_card_v2" and raw["spec_version"] == "2.0"
    assert {k: raw["data"][k] for k in original["data"]} == original["data"]
    assert card_to_json(cards[1]) == card_to_json(cards[2]) == raw
    assert greetings(cards[1], "Kyon") == ["Storm's in, Kyon. Tea's on the stove."]
    reg = CardRegistry(tmp_path / "reg")
    assert reg.get(reg.import_file(image)).name == "Mira"


def test_adapter_and_sampling_live_in_the_card(tmp_path):
    reg = CardRegistry(tmp_path / "reg")
    name = reg.import_file(V2, adapter="tiny-lora", sampling={"temperature": 0.7, "top_k": 40})
    card = reg.get(name)
    s = cardmod.rp_settings(card)
    assert s.adapter == "tiny-lora" and s.sampling.temperature == 0.7 and s.sampling.top_k == 40
    assert s.sampling.top_p is None
    original = load(V2)
    exported = load(reg.export(name, tmp_path / "h.json", "json"))
    assert exported["data"]["extensions"]["rp_ray"] == {
        "adapter": "tiny-lora",
        "sampling": {"temperature": 0.7, "top_k": 40},
    }
    del exported["data"]["extensions"]["rp_ray"]
    assert exported == original
    # the binding travels in a PNG too, and re-importing without flags keeps it
    out = reg.export(name, tmp_path / "h.png", "png")
    assert cardmod.rp_settings(read_card_file(out)).adapter == "tiny-lora"
    with pytest.raises(CardError, match=r"temperature"):
        reg.import_file(V2, name="hot", sampling={"temperature": 9.0})
    odd = load(V2)
    odd["data"]["extensions"]["rp_ray"] = "tiny-lora"
    with pytest.raises(CardError, match=r"odd.json: field data.extensions.rp_ray: must be an object"):
        cardmod.with_rp_settings(cardmod.card_from_dict(odd, "odd.json"), adapter="x", source="odd.json")
    with pytest.raises(CardError, match=r"odd.json: field data.extensions.rp_ray"):
        cardmod.rp_settings(cardmod.card_from_dict(odd, "odd.json"), "odd.json")


def test_registry_names_and_conflicts(tmp_path):
    reg = CardRegistry(tmp_path / "reg")
    assert reg.import_file(V2) == "haruhi"
    with pytest.raises(CardError, match="already in .*--force"):
        reg.import_file(V2)
    assert reg.import_file(V2, overwrite=True) == "haruhi"
    assert reg.import_file(V2, name="Haruhi.v2") == "Haruhi.v2"
    with pytest.raises(CardError, match="card name '../x'"):
        reg.import_file(V2, name="../x")
    with pytest.raises(CardError, match="no card named 'nobody'.*Haruhi.v2, haruhi"):
        reg.get("nobody")
    raw = load(V2)
    raw["data"]["name"] = "涼宮ハルヒ"
    zh = reg.add(cardmod.card_from_dict(raw, "zh.json"))
    assert zh.startswith("card-") and len(zh) == 13 and reg.get(zh).name == "涼宮ハルヒ"
    assert cardmod.slugify("Dr. Jekyll & Mr. Hyde!") == "dr.-jekyll-mr.-hyde"


# -- prompt assembly -----------------------------------------------------------------------------------------------


def test_build_messages_order_macros_and_no_creator_notes():
    card = read_card_file(V3)
    msgs = ["Long ago: a sword duel.", "Take this to the Ark before the fight.", "First ramen. Keep your sword dry."]
    lore = activate(card.book, msgs, lambda t: len(t.split()))
    history = [
        {"role": "assistant", "content": greetings(card, "Kyon")[0]},
        {"role": "user", "content": "Hi {{Char}}, I'm {{user}}."},
    ]
    out = build_messages(card, history, user_name="Kyon", default_system="DEFAULT for {{char}}.", lore=lore)
    assert [m["role"] for m in out] == ["system", "assistant", "user", "system"]
    system = out[0]["content"]
    parts = [
        "DEFAULT for Aoi Kurosawa.\nNever speak for Kyon.",  # {{original}} -> default system
        "The year is 2099; the city never dries.",  # before_char lore, by insertion_order
        "The Ark is the couriers' guild hall, under the Tower.",
        "Aoi Kurosawa is a courier in rain-soaked Neo-Kyoto who takes odd jobs from Kyon.",
        "Aoi Kurosawa's personality: curious, blunt, secretly kind",
        "Scenario: Kyon hires Aoi Kurosawa to carry a sealed box across the city.",
        "Aoi Kurosawa eats at the same noodle stall every night.",  # after_char lore, decorator line gone
        "Aoi Kurosawa's sword is called Hoshi; it hums in the rain.",
        "[Example Chat]\nKyon: Where are you headed?\nAoi Kurosawa: Wherever the rain isn't.",
        "[Example Chat]\nKyon: Are you fast?\nAoi Kurosawa: Faster than the trains.",
    ]
    assert system == "\n\n".join(parts)
    assert out[1]["content"] == "Hey Kyon. Rain's heavy tonight. Got a package for me?"
    assert out[2]["content"] == "Hi Aoi Kurosawa, I'm Kyon."
    assert out[3] == {"role": "system", "content": "Reply as Aoi Kurosawa in under 60 words."}
    everything = json.dumps(out, ensure_ascii=False)
    assert "CREATOR-NOTE-SENTINEL" not in everything and "DISABLED-SENTINEL" not in everything
    assert "{{" not in everything and "@@" not in everything
    assert greetings(card, "Kyon") == [
        "Hey Kyon. Rain's heavy tonight. Got a package for me?",
        "Rainy night, Kyon. Need a runner?",
        "Kyon, you're late. Aoi Kurosawa doesn't wait.",
    ]


def test_build_messages_defaults_and_empty_parts():
    card = read_card_file(V2)  # no system prompt, examples, post-history
    out = build_messages(card, [{"role": "user", "content": "hello"}], default_system="Be {{char}}.")
    assert out[0]["content"] == (
        "Be Haruhi.\n\nHaruhi is the self-appointed brigade chief of the SOS Brigade.\n\n"
        "Haruhi's personality: energetic, bossy, easily bored\n\n"
        "Scenario: After school in the literature club room; User has just walked in."
    )
    assert out[1:] == [{"role": "user", "content": "hello"}]
    # history items may be objects with role/content (serving's pydantic messages)
    msg = SimpleNamespace(role="user", content="hi {{char}}")
    assert build_messages(card, [msg], default_system="")[1:] == [{"role": "user", "content": "hi Haruhi"}]
    assert build_messages(card, [], default_system="", default_post_history="Stay brief.")[-1] == {
        "role": "system",
        "content": "Stay brief.",
    }


def test_a_chatharuhi_card_gives_the_data_layout():
    persona = "你正在扮演凉宫春日。\n请用春日的语气回答。"
    scenes = ["阿虚:「早」\n春日:「迟到了！」", "春日:「SOS团集合！」"]
    raw = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "春日", "system_prompt": persona}}
    card = cardmod.card_from_dict(raw, "haruhi.json")
    assert system_prompt(card, default_system="unused", scenes=scenes) == join_system_prompt(persona, scenes)
    assert system_prompt(card, default_system="unused") == persona


# -- malformed files -----------------------------------------------------------------------------------------------


def _png_with(chunks: dict[bytes, bytes]) -> bytes:
    base = png.placeholder_png(2, 2)
    parsed = png.read_chunks(base)
    extra = [png.Chunk(t, d) for t, d in chunks.items()]
    return png.SIGNATURE + b"".join(c.encode() for c in [*parsed[:-1], *extra, parsed[-1]])


def _v2(**data) -> bytes:
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "X", **data}}).encode()


GOOD_PNG = cardmod.card_png_bytes(parse_card(_v2(), "x"))
BAD_CRC = bytearray(GOOD_PNG)
BAD_CRC[8 + 25 + 8 + 2] ^= 0xFF  # a byte of the IDAT data (after the signature and IHDR): its CRC no longer matches

MALFORMED = {
    "not_a_card.json": (b'{"hello": "world", "list": [1, 2]}', "not a character card"),
    "invalid.json": (b'{"spec": "chara_card_v2", "data": {', "not valid JSON at line 1"),
    "empty.json": (b"   \n", "empty file"),
    "array.json": (b"[1, 2, 3]", "a character card is a JSON object"),
    "latin1.json": ('{"name": "Zoë", "description": "é"}'.encode("latin-1"), "not UTF-8"),
    "broken_base64.png": (_png_with({b"tEXt": b"chara\0@@@not base64@@@"}), "not valid base64"),
    "non_utf8_payload.png": (
        _png_with({b"tEXt": b"chara\0" + base64.b64encode(b'{"name": "\xff\xfe"}')}),
        "PNG chunk 'chara': not UTF-8",
    ),
    "wrong_spec.json": (
        json.dumps({"spec": "chara_card_v9", "spec_version": "9.0", "data": {}}).encode(),
        "field spec",
    ),
    "wrong_version.json": (
        json.dumps({"spec": "chara_card_v2", "spec_version": "3.0", "data": {}}).encode(),
        "spec_version",
    ),
    "wrong_types.json": (_v2(alternate_greetings="hi", tags=[1]), "field data.alternate_greetings"),
    "wrong_book_types.json": (
        _v2(character_book={"entries": [{"keys": "sword"}]}),
        "data.character_book.entries[0].keys",
    ),
    "huge_field.json": (_v2(description="x" * (65 * 1024)), "over the 64 KiB limit"),
    "huge_file.json": (_v2(description="x") + b" " * (2 * 1024 * 1024), "over the 2 MiB limit"),
    "plain_image.png": (pillow_png({"Title": "just a picture"}), "PNG without a character card"),
    "truncated.png": (GOOD_PNG[: len(GOOD_PNG) // 2], "truncated PNG"),
    "bad_crc.png": (bytes(BAD_CRC), "bad CRC"),
    "empty_name.json": (_v2(name="  "), "field data.name: the name is empty"),
    "no_name.json": (json.dumps({"spec": "chara_card_v3", "spec_version": "3.0", "data": {}}).encode(), "data.name"),
    "lorebook_not_card.json": (json.dumps({"entries": []}).encode(), "this is a lorebook"),
    "deep_nesting.json": (_v2(extensions={"x": json.loads("[" * 500 + "]" * 500)}), "nested more than 64 levels"),
    "png_not_png_payload.png": (_png_with({b"tEXt": b"ccv3\0" + base64.b64encode(b"[1]")}), "JSON object"),
}


@pytest.mark.parametrize("file_name", sorted(MALFORMED))
def test_malformed_card_files_give_a_clear_error(tmp_path, file_name):
    data, fragment = MALFORMED[file_name]
    path = tmp_path / file_name
    path.write_bytes(data)
    with pytest.raises(CardError) as info:
        read_card_file(path)
    message = str(info.value)
    assert file_name in message and fragment in message, message


# the most a card chunk may hold: the base64 of a card JSON at the limit
CHUNK_LIMIT = 4 * -(-cardmod.MAX_JSON_BYTES // 3)


def _ztxt(keyword: str, size: int) -> bytes:
    return keyword.encode() + b"\0\0" + zlib.compress(b"A" * size, 9)


def test_png_text_bombs_are_refused_quickly():
    """Only the card chunks are decoded, each inflated no further than a card JSON at the limit needs: 8 zTXt
    chunks of 20 MiB each under the card keyword are refused fast, and under another keyword never inflated."""
    bomb = _ztxt("chara", 20 * 1024 * 1024)
    chunks = [png.Chunk(b"zTXt", bomb)] * 8
    base = png.read_chunks(png.placeholder_png(2, 2))
    data = png.SIGNATURE + b"".join(c.encode() for c in [*base[:-1], *chunks, base[-1]])
    start = time.perf_counter()
    with pytest.raises(CardError) as info:
        parse_card(data, "bomb.png")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 0.5, elapsed
    assert message.startswith("bomb.png: compressed text chunk 'chara' inflates past the limit of ") and (
        "within the 2 MiB JSON limit" in message and "shrink the card" in message
    ), message
    # the same chunks under another keyword are skipped: the card beside them reads, quickly
    other = png.Chunk(b"zTXt", _ztxt("Comment", 20 * 1024 * 1024 + 1))
    card = png.Chunk(b"tEXt", b"chara\0" + b64(load(V2)).encode())
    data = png.SIGNATURE + b"".join(c.encode() for c in [*base[:-1], *[other] * 8, card, base[-1]])
    start = time.perf_counter()
    assert parse_card(data, "comments.png").name == "Haruhi"
    assert time.perf_counter() - start < 0.5


def test_card_chunk_limit_is_the_json_limit():
    """A card chunk at the limit reads (compressed or not); one byte more is refused, before inflating further."""
    base = png.read_chunks(png.placeholder_png(2, 2))

    def with_chunk(chunk: png.Chunk) -> bytes:
        return png.SIGNATURE + b"".join(c.encode() for c in [*base[:-1], chunk, base[-1]])

    for size, ok in ((CHUNK_LIMIT, True), (CHUNK_LIMIT + 1, False)):
        for chunk in (png.Chunk(b"zTXt", _ztxt("ccv3", size)), png.Chunk(b"tEXt", b"ccv3\0" + b"A" * size)):
            found = None
            try:
                found = png.find_text(with_chunk(chunk), ("ccv3", "chara"), CHUNK_LIMIT)
            except png.TextTooLarge as e:
                assert not ok and f"the limit of {CHUNK_LIMIT} bytes" in str(e)
            assert (found == ("ccv3", "A" * size)) is ok, (size, chunk.type)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CardError, match="no such file"):
        read_card_file(tmp_path / "nope.png")
    with pytest.raises(CardError, match="is a directory"):
        read_card_file(tmp_path)


# -- the command line ----------------------------------------------------------------------------------------------


def rp_ray(*args: str) -> subprocess.CompletedProcess:
    # `python -m` from the repo root: this checkout's rp_ray, whatever the installed entry point points at
    return subprocess.run(
        [sys.executable, "-m", "rp_ray.cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_import_export_show_round_trip(tmp_path):
    reg = str(tmp_path / "reg")
    r = rp_ray("card", "import", str(V3), "--registry", reg, "--adapter", "tiny-lora", "--temperature", "0.8")
    assert r.returncode == 0, r.stderr
    assert "as 'aoi-kurosawa' (chara_card_v3" in r.stdout and "6 lorebook entries" in r.stdout
    out = tmp_path / "aoi.png"
    r = rp_ray("card", "export", "aoi-kurosawa", "--png", "--out", str(out), "--registry", reg)
    assert r.returncode == 0, r.stderr
    expected = load(V3)
    expected["data"]["extensions"]["rp_ray"] = {"adapter": "tiny-lora", "sampling": {"temperature": 0.8}}
    assert card_to_json(read_card_file(out)) == expected


def test_cli_show_and_list(tmp_path, capsys):
    from rp_ray.cli.main import main  # in-process: the subprocess tests above cover the entry point

    reg = str(tmp_path / "reg")
    assert main(["card", "import", str(V3), "--registry", reg, "--adapter", "tiny-lora", "--temperature", "0.8"]) == 0
    assert main(["card", "show", "aoi-kurosawa", "--registry", reg, "--user", "Kyon"]) == 0
    out = capsys.readouterr().out
    assert "== system prompt ==" in out and "Never speak for Kyon." in out
    assert "== after the chat history (system) ==\nReply as Aoi Kurosawa in under 60 words." in out
    assert "== greeting 3 ==\nKyon, you're late. Aoi Kurosawa doesn't wait." in out
    assert "CREATOR-NOTE-SENTINEL" not in out and "adapter: tiny-lora" in out and "'temperature': 0.8" in out
    assert main(["card", "list", "--registry", reg]) == 0
    assert "aoi-kurosawa\tAoi Kurosawa\tchara_card_v3\ttiny-lora" in capsys.readouterr().out
    assert main(["card", "show", "nobody", "--registry", reg]) == 2
    assert "no card named 'nobody'" in capsys.readouterr().err


def test_cli_shows_card_text_without_letting_it_drive_the_terminal(tmp_path, capsys):
    """A downloaded card's text may hold escape sequences (here a clipboard write, OSC 52, and a screen clear):
    `card show` and `card list` print them as text, as the chat REPL does."""
    from rp_ray.cli.main import main

    osc52, clear = "\x1b]52;c;ZWNobyBwd25lZA==\x07", "\x1b[2J"
    data = {"name": f"Evil{clear}", "description": f"hi{osc52}", "first_mes": f"hello{clear}"}
    card = tmp_path / "evil.json"
    card.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}))
    reg = str(tmp_path / "reg")
    assert main(["card", "import", str(card), "--registry", reg, "--name", "evil"]) == 0
    assert main(["card", "show", "evil", "--registry", reg]) == 0
    assert main(["card", "list", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "hi\\x1b]52;c;ZWNobyBwd25lZA==\\x07" in out and "hello\\x1b[2J" in out and "evil\tEvil\\x1b[2J" in out


@pytest.mark.parametrize("file_name", ["broken_base64.png", "not_a_card.json"])
def test_cli_bad_card_exits_2_without_traceback(tmp_path, file_name):
    path = tmp_path / file_name
    path.write_bytes(MALFORMED[file_name][0])
    r = rp_ray("card", "import", str(path), "--registry", str(tmp_path / "reg"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and file_name in r.stderr and MALFORMED[file_name][1] in r.stderr
    assert "Traceback" not in r.stderr
