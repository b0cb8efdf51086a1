"""Character cards as role-play users bring them: Character Card V2 / V3 JSON, or a PNG carrying the card.

Formats read (the card JSON is kept exactly as it came; the pydantic models only validate and give typed access):

- V2: ``{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}``; data holds name, description,
  personality, scenario, first_mes, mes_example, creator_notes (never part of a prompt), system_prompt (replaces
  the default system prompt; ``{{original}}`` inside it stands for the default), post_history_instructions (sent
  after the chat history), alternate_greetings, tags, creator, character_version, extensions (free-form, kept
  byte for byte) and an optional character_book (lorebook: see ``lorebook.py``).
- V3: ``{"spec": "chara_card_v3", "spec_version": "3.0", "data": {...}}``: V2's data plus assets
  (``[{type, uri, name, ext}]``), nickname, creator_notes_multilingual, source, group_only_greetings,
  creation_date and modification_date (unix seconds); lorebook entries add use_regex and ``@@decorators``.
  spec_version ``3.x`` is read as V3 (minor versions only add fields).
- V1: a flat object (name, description, personality, scenario, first_mes, mes_example; no spec), or those fields
  under ``data`` with ``spec: "chara_card_v1"`` (as the ``tavern-card`` package writes them), is upgraded to V2 on
  reading (logged); unknown V1 keys stay in ``data``.
- PNG: a text chunk ``ccv3`` (V3) or ``chara`` (V2) holding base64 of the UTF-8 card JSON; ``ccv3`` is read first.
  Written PNGs carry both: ``chara`` the V2 rendering (V3-only data fields left out) and ``ccv3`` the V3 card (a V2
  card is promoted: spec ``chara_card_v3``, ``group_only_greetings: []`` added when absent), so reading an exported
  PNG gives the V3 card. Files are told apart by their bytes (PNG signature), never by their extension.

Fields missing from a card read as empty (``""``, ``[]``, ``{}``) and ``null`` reads as missing; nothing is added to
the stored JSON. A present field of the wrong type is an error. Limits: each text field at most 64 KiB (UTF-8), the
name at most ``MAX_NAME_CHARS`` characters (it replaces every ``{{char}}``), a JSON card file at most 2 MiB (in a
PNG, the card chunk at most the base64 of that, compressed or not), a PNG card at most 20 MiB, JSON nesting at most
64 levels, a lorebook at most ``MAX_BOOK_ENTRIES`` entries, and an entry's keys as ``keys.check_keys`` says. Every
problem is a ``CardError`` naming the file, the field and the fix.

rp_ray's own settings for a card (the served adapter it speaks through and its default sampling) live inside the
card, in ``data.extensions["rp_ray"] = {"adapter": ..., "sampling": {"temperature", "top_p", "top_k",
"max_tokens"}}``, so they travel with it; a characters_file entry is read as a V2 card with its system prompt and
these settings (plus its display_name and greeting). ``CardRegistry`` keeps imported cards as
``<root>/<name>.json``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rp_ray.character import png
from rp_ray.character.keys import check_keys
from rp_ray.character.names import NAME_RULE, is_name
from rp_ray.files import write_atomic

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 64 * 1024
# every {{char}} / <BOT> in the card's texts and in a chat's messages becomes the name, so a long one multiplies them
MAX_NAME_CHARS = 256
MAX_JSON_BYTES = 2 * 1024 * 1024
MAX_PNG_BYTES = 20 * 1024 * 1024
MAX_BOOK_ENTRIES = 1024
SPEC_V1, SPEC_V2, SPEC_V3 = "chara_card_v1", "chara_card_v2", "chara_card_v3"
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
V3_ONLY_FIELDS = (
    "assets",
    "nickname",
    "creator_notes_multilingual",
    "source",
    "group_only_greetings",
    "creation_date",
    "modification_date",
)
RP_RAY_EXTENSION = "rp_ray"


class CardError(ValueError):
    """A card file that cannot be used; the message names the file and the field and says how to fix it."""


def _cap(text: str) -> str:
    n = len(text.encode("utf-8"))
    if n > MAX_TEXT_BYTES:
        raise ValueError(f"text of {n} bytes is over the {MAX_TEXT_BYTES // 1024} KiB limit per field; shorten it")
    return text


Text = Annotated[str, AfterValidator(_cap)]
Number = int | float


class SpecModel(BaseModel):
    """Strict types for the spec's fields; unknown keys are kept (``extra="allow"``); ``null`` reads as absent."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if not (v is None and k in cls.model_fields)}
        return value


class BookEntry(SpecModel):
    """One lorebook entry (V2; ``use_regex`` from V3)."""

    keys: list[Text] = []
    content: Text = ""
    extensions: dict[str, Any] = {}
    enabled: bool = True
    insertion_order: Number = 0
    case_sensitive: bool | None = None
    name: Text | None = None
    priority: Number | None = None
    id: Number | str | None = None
    comment: Text | None = None
    selective: bool | None = None
    secondary_keys: list[Text] = []
    constant: bool | None = None
    position: Literal["before_char", "after_char"] | None = None
    use_regex: bool | None = None

    @model_validator(mode="after")
    def _usable_keys(self) -> BookEntry:
        check_keys(self.keys, self.secondary_keys, self.content, self.name or self.comment)
        return self


class Lorebook(SpecModel):
    """A character_book (or a standalone lorebook file)."""

    name: Text | None = None
    description: Text | None = None
    scan_depth: int | None = Field(None, ge=0)
    token_budget: int | None = Field(None, ge=0)
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = {}
    entries: list[BookEntry] = []

    @field_validator("entries", mode="before")
    @classmethod
    def _few_enough(cls, entries: Any) -> Any:
        # counted before each entry is validated, so an oversized book is refused without compiling its keys
        if isinstance(entries, list) and len(entries) > MAX_BOOK_ENTRIES:
            raise ValueError(
                f"{len(entries)} entries, over the limit of {MAX_BOOK_ENTRIES} per lorebook; remove or merge entries"
            )
        return entries


class CardData(SpecModel):
    """The ``data`` of a V2 card."""

    name: Text
    description: Text = ""
    personality: Text = ""
    scenario: Text = ""
    first_mes: Text = ""
    mes_example: Text = ""
    creator_notes: Text = ""
    system_prompt: Text = ""
    post_history_instructions: Text = ""
    alternate_greetings: list[Text] = []
    tags: list[Text] = []
    creator: Text = ""
    character_version: Text = ""
    extensions: dict[str, Any] = {}
    character_book: Lorebook | None = None

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the name is empty; give the character a name")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(
                f"the name is {len(name)} characters, over the limit of {MAX_NAME_CHARS} (it replaces every "
                f"{{{{char}}}} in the card and the chat); shorten it"
            )
        return name


class Asset(SpecModel):
    type: Text
    uri: str  # may be a data: URI, so not capped per field (the file limit applies)
    name: Text
    ext: Text


class CardDataV3(CardData):
    """The ``data`` of a V3 card: V2's plus the V3 fields."""

    assets: list[Asset] | None = None
    nickname: Text | None = None
    creator_notes_multilingual: dict[str, Text] | None = None
    source: list[Text] | None = None
    group_only_greetings: list[Text] = []
    creation_date: Number | None = None
    modification_date: Number | None = None


class Sampling(BaseModel):
    """A character's default sampling (rp_ray's own): a request's own value wins, an unset one is the server's."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)


class RpRaySettings(BaseModel):
    """``data.extensions["rp_ray"]``: the served adapter (None = the base model) and default sampling; a
    characters_file entry also keeps its display name and greeting here."""

    model_config = ConfigDict(extra="allow")
    adapter: str | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    display_name: str | None = Field(None, min_length=1)
    greeting: str | None = None


@dataclass(frozen=True)
class Card:
    """A validated card: ``raw`` is its JSON exactly as read (a V1 card upgraded to V2), ``data`` the typed view."""

    data: CardData
    raw: dict[str, Any]

    @property
    def spec(self) -> str:
        return self.raw["spec"]

    @property
    def version(self) -> int:
        return 3 if self.spec == SPEC_V3 else 2

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def book(self) -> Lorebook | None:
        return self.data.character_book


# -- reading -----------------------------------------------------------------------------------------------------


UNION_TAGS = ("int", "float", "str", "bool", "none")


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in UNION_TAGS or part.startswith(("literal[", "function-"))):
            continue  # the member of a union type pydantic tried, not a field
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(
    source: str, prefix: str, e: ValidationError, fix: str = "fix the field in the card's JSON"
) -> str:
    """``file: field X: what is wrong (got Y); field Z: ...; fix`` for the first 3 fields with a problem."""
    problems: dict[str, str] = {}
    for err in e.errors():
        where = _where((prefix, *err["loc"])) if prefix else _where(err["loc"])
        if where in problems:
            continue  # one line per field (a union type reports each member)
        got = err.get("input")
        msg = "missing (it is required)" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "value_error") and not isinstance(got, dict | list):
            msg += f" (got {type(got).__name__} {str(got)[:40]!r})"
        problems[where] = msg
    lines = [f"field {w}: {m}" for w, m in list(problems.items())[:3]]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{source}: " + "; ".join(lines) + more + f"; {fix}"


def _upgrade_v1(obj: dict[str, Any], source: str) -> dict[str, Any]:
    log.info("%s: V1 card upgraded to %s", source, SPEC_V2)
    # every V2 data field, the V1 ones from the card and the others empty (the optional character_book left out)
    fields = [f for f in CardData.model_fields if f != "character_book"]
    data: dict[str, Any] = {
        f: obj.get(f, "") if f in V1_FIELDS else copy.deepcopy(CardData.model_fields[f].default) for f in fields
    }
    data |= {k: v for k, v in obj.items() if k not in data}
    return {"spec": SPEC_V2, "spec_version": "2.0", "data": data}


MAX_DEPTH = 64


# json.loads accepts an unpaired "\ud800" escape; no UTF-8 writer (the registry's, a PNG export's) can store it
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(source: str, text: str) -> CardError:
    m = _SURROGATE.search(text)
    return CardError(
        f"{source}: text {text[:40]!r} is not valid Unicode (a lone surrogate \\u{ord(m.group()):04x} at character "
        f"{m.start()}); the JSON escapes half of a UTF-16 pair: fix or drop that text"
    )


def _check_depth(obj: Any, source: str) -> None:
    """JSON nested deeper than ``MAX_DEPTH`` is refused (it would only exhaust the stack later), and so is text
    (a key too) holding a lone surrogate: the free-form fields (extensions) are stored as they came."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CardError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep; flatten the card's extensions")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _lone_surrogate(source, value)
        elif isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def card_from_dict(obj: Any, source: str) -> Card:
    """Validate a parsed card JSON (V1, V2 or V3); the result keeps a deep copy of ``obj``."""
    if not isinstance(obj, dict):
        raise CardError(f"{source}: a character card is a JSON object, got a JSON {type(obj).__name__}")
    _check_depth(obj, source)
    if obj.get("spec") == SPEC_V1 and isinstance(obj.get("data"), dict):
        obj = _upgrade_v1(obj["data"], source)
    elif "spec" not in obj:
        if isinstance(obj.get("name"), str) and any(f in obj for f in V1_FIELDS[1:]):
            obj = _upgrade_v1(obj, source)
        elif "entries" in obj:
            raise CardError(f"{source}: this is a lorebook (it has entries), not a character card")
        else:
            raise CardError(
                f"{source}: not a character card: no field spec (V2/V3: spec, spec_version, data) and no V1 fields "
                f"(name, description, first_mes, ...)"
            )
    spec, version = obj.get("spec"), obj.get("spec_version")
    if spec == SPEC_V2:
        if version != "2.0":
            raise CardError(f'{source}: field spec_version: {version!r} with spec {SPEC_V2}; it must be "2.0"')
        model: type[CardData] = CardData
    elif spec == SPEC_V3:
        if not (isinstance(version, str) and re.fullmatch(r"3\.\d+", version)):
            raise CardError(f'{source}: field spec_version: {version!r} with spec {SPEC_V3}; it must be "3.0"')
        model = CardDataV3
    else:
        raise CardError(f"{source}: field spec: {spec!r} is not a card spec this reader knows ({SPEC_V2}, {SPEC_V3})")
    if not isinstance(obj.get("data"), dict):
        raise CardError(f"{source}: field data: missing or not an object; a {spec} card keeps its fields in data")
    try:
        data = model.model_validate(obj["data"])
    except ValidationError as e:
        raise CardError(validation_message(source, "data", e)) from None
    return Card(data=data, raw=copy.deepcopy(obj))


def _decode_payload(payload: str, keyword: str, source: str) -> Any:
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise CardError(
            f"{source}: PNG chunk {keyword!r} is not valid base64 ({e}); the card data is damaged, export it again"
        ) from None
    return decode_json(raw, source, f"PNG chunk {keyword!r}: ")


def decode_json(raw: bytes, source: str, where: str = "") -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CardError(
            f"{source}: {where}not UTF-8 text (bad byte at offset {e.start}); re-save the card as UTF-8 JSON"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CardError(f"{source}: {where}not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise CardError(f"{source}: {where}JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise CardError(f"{source}: {where}not usable JSON: {e}") from None


def parse_card(raw: bytes, source: str) -> Card:
    """A card from a file's bytes (PNG or JSON, told apart by content); ``source`` (the file name) is named in every
    error."""
    if png.is_png(raw):
        if len(raw) > MAX_PNG_BYTES:
            raise CardError(f"{source}: PNG of {len(raw)} bytes is over the {MAX_PNG_BYTES >> 20} MiB limit")
        try:
            # the chunk holds the card JSON as base64 (4 characters per 3 bytes), so it is capped at the JSON limit
            found = png.find_text(raw, ("ccv3", "chara"), limit=4 * -(-MAX_JSON_BYTES // 3))
        except png.TextTooLarge as e:
            raise CardError(
                f"{source}: {e}, more than a card within the {MAX_JSON_BYTES >> 20} MiB JSON limit needs; the card "
                f"is too large or the file is damaged: shrink the card or export it again"
            ) from None
        except png.PngError as e:
            raise CardError(f"{source}: {e}") from None
        if found is not None:
            keyword, text = found
            return card_from_dict(_decode_payload(text, keyword, source), source)
        raise CardError(
            f"{source}: PNG without a character card (no 'ccv3' or 'chara' text chunk); it is a plain image. "
            f"Export the card again from the app it came from, or import its JSON"
        )
    if len(raw) > MAX_JSON_BYTES:
        raise CardError(f"{source}: JSON of {len(raw)} bytes is over the {MAX_JSON_BYTES >> 20} MiB limit for a card")
    if not raw.strip():
        raise CardError(f"{source}: empty file; a card is a JSON object or a PNG with a card chunk")
    return card_from_dict(decode_json(raw, source), source)


def read_file_bytes(path: str | Path) -> bytes:
    """A card file's bytes, refusing directories and files over the PNG limit before reading them."""
    p = Path(path)
    try:
        if p.is_dir():
            raise CardError(f"{p}: is a directory; name a card file (.json or .png)")
        size = p.stat().st_size
        if size > MAX_PNG_BYTES:
            raise CardError(f"{p}: {size} bytes is over the {MAX_PNG_BYTES >> 20} MiB limit for a card file")
        return p.read_bytes()
    except FileNotFoundError:
        raise CardError(f"{p}: no such file") from None
    except OSError as e:
        raise CardError(f"{p}: cannot read the file: {e.strerror}") from None


def read_card_file(path: str | Path) -> Card:
    """The card in a JSON or PNG file (sniffed by content)."""
    return parse_card(read_file_bytes(path), str(path))


# -- writing -----------------------------------------------------------------------------------------------------


def card_to_json(card: Card) -> dict[str, Any]:
    """The card's JSON as it came (V2 or V3), a copy."""
    return copy.deepcopy(card.raw)


def card_to_v2_json(card: Card) -> dict[str, Any]:
    """The V2 rendering: a V2 card as it came; a V3 card as V2 with the V3-only data fields left out."""
    if card.version == 2:
        return card_to_json(card)
    data = {k: copy.deepcopy(v) for k, v in card.raw["data"].items() if k not in V3_ONLY_FIELDS}
    return {"spec": SPEC_V2, "spec_version": "2.0", "data": data}


def card_to_v3_json(card: Card) -> dict[str, Any]:
    """The V3 rendering: a V3 card as it came; a V2 card promoted (``group_only_greetings: []`` added if absent)."""
    if card.version == 3:
        return card_to_json(card)
    data = copy.deepcopy(card.raw["data"])
    data.setdefault("group_only_greetings", [])
    return {"spec": SPEC_V3, "spec_version": "3.0", "data": data}


def _b64(obj: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).decode()


def card_png_bytes(card: Card, image: bytes | None = None) -> bytes:
    """A PNG of ``image`` (or a small placeholder) carrying the card in ``chara`` (V2) and ``ccv3`` (V3) chunks;
    the image's other chunks are kept, its old card chunks replaced."""
    base = png.placeholder_png() if image is None else image
    try:
        return png.write_text(base, {"chara": _b64(card_to_v2_json(card)), "ccv3": _b64(card_to_v3_json(card))})
    except png.PngError as e:
        raise CardError(f"card {card.name!r}: the image to write the card into is not usable: {e}") from None


def write_card_png(card: Card, path: str | Path, image: bytes | None = None) -> Path:
    p = Path(path)
    p.write_bytes(card_png_bytes(card, image))
    return p


def dump_json(obj: Any) -> str:
    """How rp_ray writes card JSON (registry files and exports): UTF-8, indent 2, key order kept."""
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


# -- rp_ray's settings inside the card ------------------------------------------------------------------------


def rp_settings(card: Card, source: str | None = None) -> RpRaySettings:
    """The card's ``data.extensions["rp_ray"]`` (adapter + sampling); defaults when absent."""
    raw = card.data.extensions.get(RP_RAY_EXTENSION) or {}
    try:
        return RpRaySettings.model_validate(raw)
    except ValidationError as e:
        raise CardError(validation_message(source or card.name, f"data.extensions.{RP_RAY_EXTENSION}", e)) from None


def with_rp_settings(
    card: Card, *, adapter: str | None = None, sampling: dict[str, Any] | None = None, source: str = "card"
) -> Card:
    """A copy of ``card`` whose ``data.extensions["rp_ray"]`` has ``adapter`` and the given sampling values set
    (other keys and values kept)."""
    raw = card_to_json(card)
    ext = raw["data"].setdefault("extensions", {})
    if not isinstance(ext, dict):
        raise CardError(f"{source}: field data.extensions: must be an object")
    mine = ext.setdefault(RP_RAY_EXTENSION, {})
    if not isinstance(mine, dict):
        raise CardError(f"{source}: field data.extensions.{RP_RAY_EXTENSION}: must be an object (adapter, sampling)")
    if adapter is not None:
        mine["adapter"] = adapter
    if sampling:
        mine["sampling"] = {**(mine.get("sampling") or {}), **{k: v for k, v in sampling.items() if v is not None}}
    new = card_from_dict(raw, source)
    rp_settings(new, source)
    return new


# -- the registry ----------------------------------------------------------------------------------------------


def slugify(name: str) -> str:
    """A registry name from a character name: ASCII letters, digits, '.', '_', '-', lower case, at most 64; names
    with no ASCII letters (e.g. Chinese) become ``card-<8 hex of the name's sha256>``."""
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-._").lower()[:64].rstrip("-._")
    return s or "card-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def check_name(name: str, what: str = "card name") -> str:
    if not is_name(name):
        raise CardError(f"{what} {name!r}: {NAME_RULE}")
    return name


def _write_atomic(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``path`` whole or not at all, so a server reading the registry never sees half a card; with
    ``overwrite=False`` an existing file is kept and a ``CardError`` raised (no race between two writers)."""
    try:
        write_atomic(path, data, exclusive=not overwrite)
    except FileExistsError:
        raise CardError(
            f"a card named {path.stem!r} is already in {path.parent}; import it under another name"
        ) from None


class CardRegistry:
    """Imported cards under ``root``: ``<name>.json`` holds the card JSON (``dump_json``), and ``<name>.png`` the
    image a PNG card came with (used again on PNG export). ``name`` is the registry name a chat request uses."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.json"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if is_name(p.stem))

    def get(self, name: str) -> Card:
        p = self.path(name)
        if not p.is_file():
            known = ", ".join(self.names()) or "none"
            raise CardError(f"no card named {name!r} in {self.root} (cards there: {known}); import it first")
        return read_card_file(p)

    def image(self, name: str) -> bytes | None:
        p = self.root / f"{check_name(name)}.png"
        return p.read_bytes() if p.is_file() else None

    def add(self, card: Card, name: str | None = None, *, image: bytes | None = None, overwrite: bool = False) -> str:
        """Store ``card`` (as its JSON) under ``name`` (default: ``slugify(card.name)``); returns the name."""
        name = check_name(name) if name is not None else slugify(card.name)
        p = self.path(name)
        if p.exists() and not overwrite:
            raise CardError(
                f"a card named {name!r} is already in {self.root}; pass --force (overwrite=True) to replace it, "
                f"or --name to import under another name"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(p, dump_json(card_to_json(card)).encode("utf-8"), overwrite=overwrite)
        # the image only once the JSON holds the name: two imports racing for one name must not leave one's card
        # beside the other's image (the JSON's no-clobber link is the claim)
        img = self.root / f"{name}.png"
        if image is not None:
            _write_atomic(img, image)
        elif img.exists():
            img.unlink()
        return name

    def import_file(
        self,
        path: str | Path,
        name: str | None = None,
        adapter: str | None = None,
        overwrite: bool = False,
        sampling: dict[str, Any] | None = None,
    ) -> str:
        """Read a card file (JSON or PNG), bind it to ``adapter`` / ``sampling`` if given, store it; returns its
        registry name."""
        raw = read_file_bytes(path)
        card = parse_card(raw, str(path))
        if adapter is not None or sampling:
            card = with_rp_settings(card, adapter=adapter, sampling=sampling, source=str(path))
        return self.add(card, name, image=raw if png.is_png(raw) else None, overwrite=overwrite)

    def export(self, name: str, out_path: str | Path, fmt: Literal["png", "json"]) -> Path:
        """Write the card as JSON (exactly as stored) or as a PNG (its own image or a placeholder, both chunks)."""
        card = self.get(name)
        out = Path(out_path)
        if fmt == "json":
            out.write_text(dump_json(card_to_json(card)), encoding="utf-8")
        elif fmt == "png":
            write_card_png(card, out, self.image(name))
        else:
            raise CardError(f"export format {fmt!r}: use png or json")
        return out
