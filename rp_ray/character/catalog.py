"""The characters a chat request can name as its ``model`` besides the base model and the adapters, and the prompt
each one builds. Ray-free; the serving code holds a ``Catalog``.

Every character is a card (``card.Card``) with rp_ray's settings in ``data.extensions["rp_ray"]``: an imported
Character Card V1/V2/V3 of the card registry, or an entry of ``characters_file`` (name, display_name,
system_prompt, adapter, greeting, sampling) read as a V2 card holding its system prompt, the rest in its settings.

Prompt rules:

- A request whose messages start with system messages (one or more, even empty ones) keeps them as its whole
  system prompt: the character then adds nothing to the prompt (no card text, lorebook or scenes) and lends only
  its adapter and sampling, as on ``/v1/completions``. SillyTavern sends its own character prompt that way.
- A characters_file character's system prompt is its ``system_prompt``, verbatim. With a scene corpus (``scenes``)
  that text is the persona, followed by the scenes retrieved for the user's last message in ChatHaruhi's layout
  (``persona + "\\n\\nClassic scenes for the role are as follows:\\n" + "\\n###\\n".join(scenes)``).
- An imported card's system prompt is ``prompt.system_prompt`` and its turns ``prompt.card_turns``. Its
  ``character_book`` and the standalone lorebook configured for it (``lorebooks``) are each activated over the
  request's messages (``lorebook.activate``, tokens counted with the served tokenizer); their entries go in by
  ``insertion_order`` (the card's book first on ties).
- Scene memory: the best ``scene_top_k`` scenes for the user's last message (``SceneIndex``, built once per
  replica), as many as fit ``scene_budget`` tokens.

``load_catalog`` runs where the serve config is read: it reads the card registry, the lorebooks and the scene
corpora, checks them with the characters_file's cards and gives plain data for the replicas. A replica's ``Catalog``
rescans the registry folder when a request names an unknown model and when the model list is asked for, cheaply
(only when the folder's mtime changed, or changed in the last seconds): a card imported through another replica
(``POST /v1/characters``) or with ``rp-ray card import`` is served without a restart, and a card file removed from
the folder is no longer served after the next rescan.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from rp_ray.character.card import (
    MAX_JSON_BYTES,
    SPEC_V2,
    Card,
    CardError,
    CardRegistry,
    Lorebook,
    RpRaySettings,
    Sampling,
    card_from_dict,
    card_to_json,
    check_name,
    dump_json,
    parse_card,
    read_card_file,
    rp_settings,
    slugify,
    with_rp_settings,
)
from rp_ray.character.lorebook import activate, entry_text, load_lorebook_file
from rp_ray.character.names import is_name, valid_name
from rp_ray.character.png import is_png
from rp_ray.character.prompt import (
    Prompt,
    Turn,
    apply_macros,
    card_macro_texts,
    card_turns,
    leading_system,
    macro_growth,
    system_prompt,
)
from rp_ray.character.scenes import (
    INDEX_FILE,
    CharacterScenes,
    SceneIndex,
    corpus_file_name,
    fit_scenes,
    join_system_prompt,
    load_scene_corpus,
)
from rp_ray.config import ConfigError, ServeConfig

log = logging.getLogger(__name__)

CountTokens = Callable[[str], int]
RESCAN_WINDOW_NS = 2_000_000_000  # a folder changed this recently is rescanned even when its mtime looks unchanged
UPLOAD = "the uploaded card"
ENTRY_SETTINGS = ("display_name", "adapter", "greeting", "sampling")  # a characters_file entry's rp_ray settings


class ImportRefused(CardError):
    """An uploaded card that is not imported: ``status`` 400 (the card or a parameter) or 409 (no registry, the
    name is taken, or the registry is at its quota), ``param`` and ``code`` as the HTTP error reports them."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class SceneMemory:
    """A character's scene corpus with its BM25 index (built once)."""

    def __init__(self, scenes: Sequence[str], budget: int, top_k: int):
        self.index = SceneIndex(scenes)
        self.budget, self.top_k = budget, top_k

    def recall(self, query: str, count_tokens: CountTokens) -> list[str]:
        """The best scenes for ``query`` that fit the token budget, best first."""
        if not query.strip():
            return []
        return fit_scenes(self.index.retrieve(query, self.top_k), count_tokens, self.budget)


@dataclass(frozen=True)
class Character:
    """A character a request names: its card and rp_ray settings, its lorebooks and scene memory. ``plain``: an
    entry of characters_file (its system prompt is used verbatim)."""

    name: str
    card: Card
    settings: RpRaySettings
    plain: bool = False
    books: tuple[Lorebook, ...] = ()
    memory: SceneMemory | None = None
    user_name: str = "User"

    def lore(self, texts: Sequence[str], count_tokens: CountTokens, deadline: float | None = None) -> list:
        """The entries every book activates over ``texts``, by insertion_order (book order on ties)."""
        found = [
            (e.insertion_order, b, e)
            for b, book in enumerate(self.books)
            for e in activate(book, texts, count_tokens, deadline=deadline)
        ]
        return [e for _, _, e in sorted(found, key=lambda t: (t[0], t[1]))]

    def check_macros(self, turns: Sequence[Turn], max_chars: int) -> None:
        """A ``ValueError`` when the chat's messages, their macros expanded, would be over ``max_chars``: each
        ``{{char}}`` becomes the card's name, so a short message may ask for a huge prompt."""
        texts = [m.content for m in turns]
        size = sum(map(len, texts)) + macro_growth(texts, self.card.name, self.user_name)
        if size > max_chars:
            raise ValueError(
                f"the messages with their macros expanded ({{{{char}}}} and <BOT> become the character's name, "
                f"{len(self.card.name)} characters; {{{{user}}}} and <USER> become {self.user_name!r}) would be {size} "
                f"characters, over the limit of {max_chars} (max_body_bytes); send fewer macros"
            )

    def prompt(
        self,
        messages: Sequence[Turn],
        count_tokens: CountTokens,
        max_chars: int | None = None,
        deadline: float | None = None,
    ) -> Prompt:
        """The chat's prompt (rules in the module docstring); ``max_chars`` bounds the messages once their macros
        are expanded (``check_macros``), ``deadline`` (``time.monotonic``) the lorebook scan."""
        own, system, turns = leading_system(messages)
        if own:
            return Prompt(system, turns)
        last_user = next((m.content for m in reversed(turns) if m.role == "user"), "")
        scenes = self.memory.recall(last_user, count_tokens) if self.memory else []
        if self.plain:
            return Prompt(join_system_prompt(self.card.data.system_prompt, scenes), turns, scenes=tuple(scenes))
        if max_chars is not None:
            self.check_macros(turns, max_chars)
        entries = self.lore([m.content for m in turns], count_tokens, deadline)
        system = system_prompt(self.card, user_name=self.user_name, lore=entries, scenes=scenes)
        lore = tuple(
            {
                "id": e.id,
                "name": e.name if e.name is not None else e.comment,
                "keys": list(e.keys),
                "tokens": count_tokens(entry_text(e)),
            }
            for e in entries
        )
        turns = card_turns(self.card, turns, self.user_name)
        return Prompt(system if system.strip() else "", turns, lore, tuple(scenes))

    def entry(self) -> dict[str, Any]:
        """The character's fields in its ``/v1/models`` entry."""
        return dict(self._entry)

    @functools.cached_property
    def _entry(self) -> dict[str, Any]:
        # built once per Character (the catalog makes one when it reads the card): the model list is fetched often
        # and its greetings are the card's texts with their macros expanded
        d, s, user = self.card.data, self.settings, self.user_name
        if self.plain:
            return {
                "display_name": s.display_name,
                "greeting": s.greeting or "",
                "system_prompt": d.system_prompt,
                "adapter": s.adapter,
            }
        return {
            "display_name": getattr(d, "nickname", None) or d.name,
            "greeting": apply_macros(d.first_mes, d.name, user),
            "alternate_greetings": [apply_macros(g, d.name, user) for g in d.alternate_greetings if g.strip()],
            "adapter": s.adapter,
            "spec": self.card.spec,
        }


# -- characters_file -----------------------------------------------------------------------------------------------


class CharacterEntry(BaseModel):
    """A characters_file entry: its name and system_prompt go in the card's ``data``, the rest
    (``ENTRY_SETTINGS``) in ``data.extensions["rp_ray"]``."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, AfterValidator(valid_name)]
    display_name: str = Field(min_length=1)
    system_prompt: str = Field(min_length=1)
    adapter: str | None = None
    greeting: str | None = None
    sampling: Sampling | None = None


def entry_card(item: Any, source: str) -> Card:
    """A characters_file entry as a V2 card (see ``CharacterEntry``)."""
    try:
        CharacterEntry.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"{p}: " for p in err["loc"])
        raise CardError(f"{source}: {where}{err['msg'].removeprefix('Value error, ')}") from None
    settings = {k: item[k] for k in ENTRY_SETTINGS if item.get(k) is not None}
    data = {"name": item["name"], "system_prompt": item["system_prompt"], "extensions": {"rp_ray": settings}}
    return card_from_dict({"spec": SPEC_V2, "spec_version": "2.0", "data": data}, source)


def load_characters_file(path: str | Path) -> dict[str, Card]:
    """The cards of a YAML or JSON file holding a list of characters (or ``{"characters": [...]}``)."""
    p = Path(path)
    if not p.is_file():
        raise CardError(f"characters file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise CardError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if isinstance(raw, dict) and "characters" in raw:
        raw = raw["characters"]
    if not isinstance(raw, list):
        raise CardError(f"{p}: expected a list of character cards")
    cards: dict[str, Card] = {}
    for i, item in enumerate(raw):
        card = entry_card(item, f"{p}: card {i}")
        if card.name in cards:
            raise CardError(f"{p}: two cards are named {card.name!r}")
        cards[card.name] = card
    return cards


# -- checks where the config is read ---------------------------------------------------------------------------------


def check_characters(cards: Mapping[str, Card], served_adapters: Collection[str], reserved: Collection[str]) -> None:
    """Every characters_file card has a name of its own (not ``reserved``: the base model's, nor a served adapter's)
    and speaks through a served adapter or the base model; a ``ConfigError`` says which card does not."""
    for name, card in cards.items():
        if name in reserved or name in served_adapters:
            raise ConfigError(f"character {name!r} has the name of the base model or an adapter")
        adapter = rp_settings(card, name).adapter
        if adapter is not None and adapter not in served_adapters:
            raise ConfigError(
                f"character {name!r} speaks through adapter {adapter!r}, which is not in adapters: "
                f"{sorted(served_adapters)}"
            )


def check_card(
    name: str,
    card: Card,
    source: str,
    taken: Mapping[str, str],
    served_adapters: Collection[str],
    user_name: str = "User",
    books: Sequence[Lorebook] | None = None,
) -> RpRaySettings:
    """An imported card's rp_ray settings, after checking its registry name is free, its adapter is served and its
    macros, expanded, add at most the card JSON limit to its texts and ``books`` (default: its own lorebook)."""
    if name in taken:
        raise ConfigError(
            f"{source}: the card's name {name!r} (the model a request names) is taken by {taken[name]}; import the "
            f"card under another name (rp-ray card import --name NAME)"
        )
    settings = rp_settings(card, source)
    if settings.adapter is not None and settings.adapter not in served_adapters:
        raise ConfigError(
            f"{source}: field data.extensions.rp_ray.adapter: {settings.adapter!r} is not a served adapter "
            f"(adapters: {sorted(served_adapters)}); bind the card to one of them (`rp-ray card import FILE --adapter "
            f"NAME --force`, or ?adapter=NAME on POST /v1/characters) or serve that adapter"
        )
    books = [card.book] if books is None and card.book is not None else books or []
    growth = macro_growth(card_macro_texts(card, books), card.name, user_name)
    if growth > MAX_JSON_BYTES:
        raise ConfigError(
            f"{source}: expanding its macros ({{{{char}}}} and <BOT> become field data.name, {len(card.name)} "
            f"characters) would add {growth} characters to the card's texts and lorebooks, over the limit of "
            f"{MAX_JSON_BYTES >> 20} MiB; use {{{{char}}}} less often or shorten the name"
        )
    return settings


def scene_corpus(path: str | Path, where: str) -> CharacterScenes:
    """One character's corpus from ``rp-ray scenes extract``'s output: its ``<key>.jsonl`` (``characters.json``
    beside it), or the folder (or its ``characters.json``) when it holds one character."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"{where}: {p}: no such file; run `rp-ray scenes extract DATASET --out DIR` and name DIR/<key>.jsonl"
        )
    root = p if p.is_dir() else p.parent
    if not (root / INDEX_FILE).is_file():
        raise ConfigError(
            f"{where}: {p}: not a scene corpus of `rp-ray scenes extract` (no {INDEX_FILE} in {root}); run it and "
            f"name the character's <key>.jsonl"
        )
    try:
        corpus = load_scene_corpus(root)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{where}: {root}: the scene corpus cannot be read ({type(e).__name__}: {e}); write it again with "
            f"`rp-ray scenes extract`"
        ) from None
    files = {corpus_file_name(c): c for c in corpus.values()}
    listed = ", ".join(sorted(files)[:8]) + (" ..." if len(files) > 8 else "")
    if p.is_dir() or p.name == INDEX_FILE:
        if len(corpus) == 1:
            return next(iter(corpus.values()))
        raise ConfigError(f"{where}: {root} holds {len(corpus)} characters; name one's file: {listed}")
    if p.name not in files:
        raise ConfigError(f"{where}: {p} is not a corpus file listed in {root / INDEX_FILE} (files: {listed})")
    return files[p.name]


def _taken(cfg: ServeConfig, characters: Collection[str]) -> dict[str, str]:
    """Names an imported card may not have -> what has them."""
    return {
        cfg.base_name: "the base model",
        **dict.fromkeys(cfg.adapters, "a served adapter"),
        **dict.fromkeys(characters, "a character of characters_file"),
    }


def _registry_cards(cfg: ServeConfig, taken: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The registry's servable cards as JSON, and the names of those skipped (logged with the file and the reason):
    one stale card (its adapter no longer served, its name now taken) must not stop the whole app, as a replica's
    rescan skips it too."""
    if cfg.card_registry is None:
        return {}, set()
    root = Path(cfg.card_registry)
    if not root.is_dir():
        raise ConfigError(
            f"card_registry {root}: no such folder; create it (mkdir -p), or import a card into it with "
            f"`rp-ray card import FILE --registry {root}`"
        )
    registry, cards, skipped = CardRegistry(root), {}, set()
    for name in registry.names():
        path = registry.path(name)
        try:
            card = read_card_file(path)
            check_card(name, card, str(path), taken, cfg.adapters, cfg.user_name)
        except (CardError, ConfigError) as e:
            log.warning("card registry: %s is not served: %s", path, e)
            skipped.add(name)
            continue
        cards[name] = card_to_json(card)
    return cards, skipped


def _skipped(what: str, name: str) -> None:
    log.warning("%s.%s: the card %r is not served (the warning above says why); skipped", what, name, name)


def _scenes(
    cfg: ServeConfig, characters: Mapping[str, Card], cards: Collection[str], skipped: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    scenes = {}
    for name, path in cfg.scenes.items():
        if name in skipped and name not in characters:
            _skipped("scenes", name)
            continue
        if name not in cards and name not in characters:
            raise ConfigError(
                f"scenes.{name}: no character named {name!r} (characters_file: {sorted(characters) or 'none'}; "
                f"card_registry: {sorted(cards) or 'none'})"
            )
        c = scene_corpus(path, f"scenes.{name}")
        if name in characters and characters[name].data.system_prompt != c.persona:
            log.warning(
                "scenes.%s: the corpus's persona (%s) differs from the character's system_prompt; the system_prompt "
                "is the persona the scenes follow",
                name,
                c.key,
            )
        scenes[name] = {"key": c.key, "persona": c.persona, "scenes": c.scenes}
    return scenes


def load_catalog(cfg: ServeConfig, characters: Mapping[str, Card]) -> dict[str, Any]:
    """Check ``characters`` (characters_file's cards) and read and check ``cfg``'s card registry, lorebooks and scene
    corpora (its paths already absolute): the plain data the replicas get, ``{"characters": {name: card JSON},
    "cards": {name: card JSON}, "lorebooks": {name: lorebook}, "scenes": {name: {key, persona, scenes}}}``. Problems
    are ``CardError`` / ``ConfigError`` naming the file, the field and the fix; but a bad card file in the registry
    is skipped with a warning naming it and the reason (with the lorebook and scenes configured for it)."""
    check_characters(characters, served_adapters=cfg.adapters, reserved={cfg.base_name})
    cards, skipped = _registry_cards(cfg, _taken(cfg, characters))
    lorebooks = {}
    for name, path in cfg.lorebooks.items():
        if name in skipped:
            _skipped("lorebooks", name)
            continue
        if name not in cards:
            raise ConfigError(
                f"lorebooks.{name}: no imported card named {name!r} in card_registry ({cfg.card_registry}); "
                f"lorebooks are for imported cards: {sorted(cards) or 'none'}"
            )
        lorebooks[name] = load_lorebook_file(path).model_dump()
    return {
        "characters": {name: card_to_json(card) for name, card in characters.items()},
        "cards": cards,
        "lorebooks": lorebooks,
        "scenes": _scenes(cfg, characters, cards, skipped),
    }


# -- in a replica ------------------------------------------------------------------------------------------------


class Catalog:
    """A replica's characters: those of characters_file, then the imported cards (the registry rescanned on a miss),
    from the data ``load_catalog`` gave."""

    def __init__(self, cfg: ServeConfig, data: Mapping[str, Any] | None = None):
        data = data or {}
        self.cfg = cfg
        self.memories = {
            n: SceneMemory(s["scenes"], cfg.scene_budget, cfg.scene_top_k) for n, s in data.get("scenes", {}).items()
        }
        self.books = {n: Lorebook.model_validate(b) for n, b in data.get("lorebooks", {}).items()}
        self.plain: dict[str, Character] = {}
        for name, raw in data.get("characters", {}).items():
            card = card_from_dict(raw, f"character {name}")
            self.plain[name] = Character(name, card, rp_settings(card), True, memory=self.memories.get(name))
        self.registry = CardRegistry(cfg.card_registry) if cfg.card_registry else None
        self.cards: dict[str, Character] = {}
        for name, raw in data.get("cards", {}).items():
            try:  # checked where the config was read, but not with its standalone lorebook
                self.cards[name] = self._character(name, card_from_dict(raw, f"card {name}"))
            except (CardError, ConfigError) as e:
                log.warning("card registry: %s is not served: %s", name, e)
        # prompts are built in worker threads (they may rescan the registry) while the event loop lists and imports
        self._lock = threading.RLock()
        # registry name -> mtime_ns of the file its card was read from
        self._files = {n: m for n in self.cards if (m := self._mtime(n)) is not None}
        self._dir_mtime: int | None = None

    @property
    def taken(self) -> dict[str, str]:
        """Names an imported card may not have (the served adapters change at run time)."""
        return _taken(self.cfg, self.plain)

    def _character(self, name: str, card: Card, source: str | None = None) -> Character:
        books = tuple(b for b in (card.book, self.books.get(name)) if b is not None)
        source = source or f"card {name!r}"
        settings = check_card(name, card, source, self.taken, self.cfg.adapters, self.cfg.user_name, books)
        return Character(name, card, settings, False, books, self.memories.get(name), self.cfg.user_name)

    def _mtime(self, name: str) -> int | None:
        try:
            return self.registry.path(name).stat().st_mtime_ns if self.registry else None
        except OSError:
            return None

    def _registry_changed(self) -> bool:
        try:
            mtime = os.stat(self.registry.root).st_mtime_ns
        except OSError:
            return False
        if mtime == self._dir_mtime and time.time_ns() - mtime > RESCAN_WINDOW_NS:
            return False
        self._dir_mtime = mtime
        return True

    def refresh(self) -> None:
        """Sync the imported cards with the registry folder when it changed: new and changed card files are read
        (a bad one is logged and not served), removed ones dropped."""
        if self.registry is None:
            return
        with self._lock:
            if self._registry_changed():
                self._rescan()

    def _rescan(self) -> None:
        found = {n: m for n in self.registry.names() if (m := self._mtime(n)) is not None}
        for name in [n for n in self.cards if n not in found]:
            log.info("card registry: %s was removed; no longer served", name)
            del self.cards[name]
            self._files.pop(name, None)
        for name, m in found.items():
            if self._files.get(name) == m:
                continue
            self._files[name] = m
            path = self.registry.path(name)
            try:
                self.cards[name] = self._character(name, read_card_file(path), str(path))
                log.info("card registry: serving %s", name)
            except (CardError, ConfigError) as e:
                self.cards.pop(name, None)
                log.warning("card registry: %s is not served: %s", name, e)

    def get(self, name: str) -> Character | None:
        """The character named ``name``; an unknown name rescans the registry first."""
        found = self.plain.get(name) or self.cards.get(name)
        if found is None and self.registry is not None and is_name(name):
            self.refresh()
            found = self.cards.get(name)
        return found

    def all(self) -> list[Character]:
        self.refresh()
        with self._lock:
            return [*self.plain.values(), *self.cards.values()]

    def _check_quota(self, adding: int) -> None:
        """Refuse an import that would put more cards or bytes in the registry folder than the serve config allows
        (``max_registry_cards``, ``max_registry_bytes``): every import writes to storage the replicas share."""
        count = size = 0
        with os.scandir(self.registry.root) as found:
            for f in found:
                if f.is_file(follow_symlinks=False):
                    size += f.stat(follow_symlinks=False).st_size
                    count += f.name.endswith(".json") and is_name(f.name.removesuffix(".json"))
        cards, most = self.cfg.max_registry_cards, self.cfg.max_registry_bytes
        fix = f"remove cards from {self.registry.root} or raise it in the serve config"
        if count >= cards:
            raise ImportRefused(
                409,
                f"the card registry holds {count} cards, its limit (max_registry_cards={cards}); {fix}",
                code="card_registry_full",
            )
        if size + adding > most:
            raise ImportRefused(
                409,
                f"the card registry holds {size} bytes and this card needs {adding} more, over its limit "
                f"(max_registry_bytes={most}); {fix}",
                code="card_registry_full",
            )

    def _upload(self, raw: bytes, adapter: str | None, name: str | None) -> tuple[Card, str]:
        """The uploaded card (bound to ``adapter`` when given) and its registry name."""
        if self.registry is None:
            raise ImportRefused(
                409,
                "this app has no card registry to import into: set card_registry (a folder) in the serve config's args",
                code="no_card_registry",
            )
        if adapter is not None and adapter not in self.cfg.adapters:
            raise ImportRefused(
                400, f"adapter {adapter!r} is not served (adapters: {sorted(self.cfg.adapters)})", param="adapter"
            )
        try:
            card = parse_card(raw, UPLOAD)
            if adapter is not None:
                card = with_rp_settings(card, adapter=adapter, source=UPLOAD)
        except CardError as e:
            raise ImportRefused(400, str(e), code="invalid_card") from None
        try:
            return card, slugify(card.name) if name is None else check_name(name)
        except CardError as e:
            raise ImportRefused(400, str(e), param="name") from None

    def import_card(self, raw: bytes, adapter: str | None = None, name: str | None = None) -> Character:
        """Validate an uploaded card file (JSON or PNG), bind it to ``adapter`` when given, add it to the registry
        under ``name`` (default: the character's name as a slug) and serve it; an ``ImportRefused`` says what is
        wrong."""
        card, name = self._upload(raw, adapter, name)
        with self._lock:
            return self._import(card, name, raw)

    def _import(self, card: Card, name: str, raw: bytes) -> Character:
        self.refresh()
        if name in self.taken or name in self.cards or self.registry.path(name).exists():
            what = self.taken.get(name, "an imported card")
            raise ImportRefused(
                409,
                f"the name {name!r} is taken by {what}; import the card under another name (?name=NAME)",
                param="name",
                code="name_taken",
            )
        try:
            character = self._character(name, card, UPLOAD)
        except (CardError, ConfigError) as e:
            raise ImportRefused(400, str(e), code="invalid_card") from None
        image = raw if is_png(raw) else None
        self._check_quota(len(dump_json(card_to_json(card)).encode("utf-8")) + len(image or b""))
        try:
            self.registry.add(card, name, image=image)
        except CardError as e:
            raise ImportRefused(409, str(e), param="name", code="name_taken") from None
        self.cards[name] = character
        self._files[name] = self._mtime(name) or 0
        log.info("card registry: imported %s (%s)", name, card.spec)
        return character
