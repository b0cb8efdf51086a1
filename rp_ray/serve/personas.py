"""The characters a chat request can name as its ``model`` besides the base model and the adapters, and the prompt
each one builds: the characters of ``characters_file`` (``YamlPersona``) and imported Character Card V2/V3 cards
(``CardPersona``), with their lorebooks and ChatHaruhi scene memory. Ray-free; ``ChatServing`` holds a ``Personas``.

Prompt rules:

- A request whose messages start with system messages (one or more, even empty ones) keeps them as its whole
  system prompt: the character then adds nothing to the prompt (no card text, lorebook or scenes) and lends only
  its adapter and sampling, as on ``/v1/completions``. SillyTavern sends its own character prompt that way.
- A characters_file character's system prompt is its ``system_prompt``. With a scene corpus (``scenes``) that text
  is the persona, followed by the scenes retrieved for the user's last message in ChatHaruhi's layout
  (``persona + "\\n\\nClassic scenes for the role are as follows:\\n" + "\\n###\\n".join(scenes)``).
- An imported card's messages are ``prompt.build_messages``: one system message (the card's system_prompt with
  ``{{original}}``, lorebook entries, description, personality, scenario, scene memory, examples), the history
  (macros applied), then ``post_history_instructions``. The training templates have one system slot, at the start,
  so the post-history instructions are appended to the last user message after a blank line: still the last text
  before the reply.
- Lorebooks: the card's ``character_book`` and the standalone lorebook configured for it (``lorebooks``) are each
  activated over the request's messages (``lorebook.activate``, each within its own ``token_budget``, counted with
  the served tokenizer); their entries go in by ``insertion_order`` (the card's book first on ties).
- Scene memory: the best ``scene_top_k`` scenes for the user's last message (``SceneIndex``, built once per
  replica), as many as fit ``scene_budget`` tokens.

``load_personas`` runs where the serve config is read (``bind_app``): it reads the card registry, the lorebooks and
the scene corpora, checks them and gives plain data for the replicas. A replica's ``Personas`` rescans the registry
folder when a request names an unknown model and when the model list is asked for, cheaply (only when the folder's
mtime changed, or changed in the last seconds): a card imported through another replica (``POST /v1/characters``)
or with ``rp-ray card import`` is served without a restart, and a card file removed from the folder is no longer
served after the next rescan.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rp_ray.character.card import (
    NAME,
    Card,
    CardError,
    CardRegistry,
    Lorebook,
    RpRaySettings,
    card_from_dict,
    card_to_json,
    check_name,
    parse_card,
    read_card_file,
    rp_settings,
    slugify,
    with_rp_settings,
)
from rp_ray.character.lorebook import activate, entry_text, load_lorebook_file
from rp_ray.character.png import is_png
from rp_ray.character.prompt import apply_macros, build_messages
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
from rp_ray.serve.characters import CharacterCard
from rp_ray.serve.protocol import APIError, ChatMessage

log = logging.getLogger(__name__)

CountTokens = Callable[[str], int]
RESCAN_WINDOW_NS = 2_000_000_000  # a folder changed this recently is rescanned even when its mtime looks unchanged
UPLOAD = "the uploaded card"


def leading_system(messages: Sequence[ChatMessage]) -> tuple[bool, str, list[ChatMessage]]:
    """(whether the messages start with system messages, those joined by blank lines (empty ones skipped), the
    turns after them); a system message after the first turn is a 400."""
    lead = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    system = "\n\n".join(m.content for m in messages[:lead] if m.content)
    turns = list(messages[lead:])
    if any(m.role == "system" for m in turns):
        raise APIError(400, "a system message may only come first", param="messages")
    return lead > 0, system, turns


def last_user(turns: Sequence[ChatMessage]) -> str:
    return next((m.content for m in reversed(turns) if m.role == "user"), "")


@dataclass(frozen=True)
class Assembly:
    """What a chat prompt is made of: the system prompt and the turns the template lays out, and (for ``rp_debug``)
    the lorebook entries and scenes that went in."""

    system: str
    turns: list[ChatMessage]
    lore: tuple[dict[str, Any], ...] = ()
    scenes: tuple[str, ...] = ()

    def debug(self) -> dict[str, Any]:
        """The ``rp_ray`` field of a response to a request with ``rp_debug: true``."""
        return {"lore": list(self.lore), "scenes": list(self.scenes), "system_prompt": self.system}


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


@dataclass
class YamlPersona:
    """A character of ``characters_file``: its system prompt (the persona when it has scene memory)."""

    card: CharacterCard
    memory: SceneMemory | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def adapter(self) -> str | None:
        return self.card.adapter

    @property
    def sampling(self):
        return self.card.sampling

    def assemble(self, messages: Sequence[ChatMessage], count_tokens: CountTokens) -> Assembly:
        own, system, turns = leading_system(messages)
        if own:
            return Assembly(system, turns)
        scenes = self.memory.recall(last_user(turns), count_tokens) if self.memory else []
        return Assembly(join_system_prompt(self.card.system_prompt, scenes), turns, scenes=tuple(scenes))

    def entry(self) -> dict[str, Any]:
        c = self.card
        return {
            "display_name": c.display_name,
            "greeting": c.greeting,
            "system_prompt": c.system_prompt,
            "adapter": c.adapter,
        }


@dataclass
class CardPersona:
    """An imported Character Card V2/V3 (its registry name is the ``model``), its lorebooks and scene memory."""

    name: str
    card: Card
    settings: RpRaySettings
    books: tuple[Lorebook, ...] = ()
    memory: SceneMemory | None = None
    user_name: str = "User"

    @property
    def adapter(self) -> str | None:
        return self.settings.adapter

    @property
    def sampling(self):
        return self.settings.sampling

    def lore(self, texts: Sequence[str], count_tokens: CountTokens) -> list:
        """The entries every book activates over ``texts``, by insertion_order (book order on ties)."""
        found = [
            (e.insertion_order, b, e) for b, book in enumerate(self.books) for e in activate(book, texts, count_tokens)
        ]
        return [e for _, _, e in sorted(found, key=lambda t: (t[0], t[1]))]

    def assemble(self, messages: Sequence[ChatMessage], count_tokens: CountTokens) -> Assembly:
        own, system, turns = leading_system(messages)
        if own:
            return Assembly(system, turns)
        entries = self.lore([m.content for m in turns], count_tokens)
        scenes = self.memory.recall(last_user(turns), count_tokens) if self.memory else []
        built = build_messages(self.card, turns, user_name=self.user_name, lore=entries, scenes=scenes)
        lead = next((i for i, m in enumerate(built) if m["role"] != "system"), len(built))
        rest = built[lead:]
        post = []
        while rest and rest[-1]["role"] == "system":
            post.insert(0, rest.pop()["content"])
        out = [ChatMessage(role=m["role"], content=m["content"]) for m in rest]
        if post and out and out[-1].role == "user":
            out[-1] = ChatMessage(role="user", content="\n\n".join([out[-1].content, *post]))
        lore = tuple(
            {
                "id": e.id,
                "name": e.name if e.name is not None else e.comment,
                "keys": list(e.keys),
                "tokens": count_tokens(entry_text(e)),
            }
            for e in entries
        )
        system = "\n\n".join(m["content"] for m in built[:lead])
        return Assembly(system, out, lore, tuple(scenes))

    def entry(self) -> dict[str, Any]:
        d = self.card.data
        char = d.name
        return {
            "display_name": getattr(d, "nickname", None) or char,
            "greeting": apply_macros(d.first_mes, char, self.user_name),
            "alternate_greetings": [apply_macros(g, char, self.user_name) for g in d.alternate_greetings if g.strip()],
            "adapter": self.settings.adapter,
            "spec": self.card.spec,
        }


Persona = YamlPersona | CardPersona


# -- where the config is read ------------------------------------------------------------------------------------


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


def check_card(
    name: str, card: Card, source: str, taken: Mapping[str, str], served_adapters: Collection[str]
) -> RpRaySettings:
    """The card's rp_ray settings, after checking its registry name is free and its adapter is served."""
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
    return settings


def load_personas(cfg: ServeConfig, characters: Mapping[str, CharacterCard]) -> dict[str, Any]:
    """Read and check ``cfg``'s card registry, lorebooks and scene corpora (its paths already absolute): the plain
    data the replicas get, ``{"cards": {name: card JSON}, "lorebooks": {name: lorebook}, "scenes": {name: {key,
    persona, scenes}}}``. Problems are ``CardError`` / ``ConfigError`` naming the file, the field and the fix."""
    taken = _taken(cfg, characters)
    cards: dict[str, dict[str, Any]] = {}
    if cfg.card_registry is not None:
        root = Path(cfg.card_registry)
        if not root.is_dir():
            raise ConfigError(
                f"card_registry {root}: no such folder; create it (mkdir -p), or import a card into it with "
                f"`rp-ray card import FILE --registry {root}`"
            )
        registry = CardRegistry(root)
        for name in registry.names():
            path = registry.path(name)
            card = read_card_file(path)
            check_card(name, card, str(path), taken, cfg.adapters)
            cards[name] = card_to_json(card)
    lorebooks = {}
    for name, path in cfg.lorebooks.items():
        if name not in cards:
            raise ConfigError(
                f"lorebooks.{name}: no imported card named {name!r} in card_registry ({cfg.card_registry}); "
                f"lorebooks are for imported cards: {sorted(cards) or 'none'}"
            )
        lorebooks[name] = load_lorebook_file(path).model_dump()
    scenes = {}
    for name, path in cfg.scenes.items():
        if name not in cards and name not in characters:
            raise ConfigError(
                f"scenes.{name}: no character named {name!r} (characters_file: {sorted(characters) or 'none'}; "
                f"card_registry: {sorted(cards) or 'none'})"
            )
        c = scene_corpus(path, f"scenes.{name}")
        if name in characters and characters[name].system_prompt != c.persona:
            log.warning(
                "scenes.%s: the corpus's persona (%s) differs from the character's system_prompt; the system_prompt "
                "is the persona the scenes follow",
                name,
                c.key,
            )
        scenes[name] = {"key": c.key, "persona": c.persona, "scenes": c.scenes}
    return {"cards": cards, "lorebooks": lorebooks, "scenes": scenes}


# -- in a replica ------------------------------------------------------------------------------------------------


class Personas:
    """A replica's characters: those of characters_file, then the imported cards (the registry rescanned on a miss)."""

    def __init__(
        self, cfg: ServeConfig, characters: Mapping[str, CharacterCard], data: Mapping[str, Any] | None = None
    ):
        data = data or {}
        self.cfg = cfg
        self.taken = _taken(cfg, characters)
        self.memories = {
            n: SceneMemory(s["scenes"], cfg.scene_budget, cfg.scene_top_k) for n, s in data.get("scenes", {}).items()
        }
        self.books = {n: Lorebook.model_validate(b) for n, b in data.get("lorebooks", {}).items()}
        self.yaml = {n: YamlPersona(c, self.memories.get(n)) for n, c in characters.items()}
        self.registry = CardRegistry(cfg.card_registry) if cfg.card_registry else None
        self.cards: dict[str, CardPersona] = {}
        self._files: dict[str, int] = {}  # registry name -> mtime_ns of the file its card was read from
        self._dir_mtime: int | None = None
        for name, raw in data.get("cards", {}).items():
            self.cards[name] = self._persona(name, card_from_dict(raw, f"card {name}"))
            mtime = self._mtime(name)
            if mtime is not None:
                self._files[name] = mtime

    def _persona(self, name: str, card: Card, source: str | None = None) -> CardPersona:
        settings = check_card(name, card, source or f"card {name!r}", self.taken, self.cfg.adapters)
        books = tuple(b for b in (card.book, self.books.get(name)) if b is not None)
        return CardPersona(name, card, settings, books, self.memories.get(name), self.cfg.user_name)

    def _mtime(self, name: str) -> int | None:
        try:
            return self.registry.path(name).stat().st_mtime_ns if self.registry else None
        except OSError:
            return None

    def refresh(self) -> None:
        """Sync the imported cards with the registry folder when it changed: new and changed card files are read
        (a bad one is logged and not served), removed ones dropped."""
        if self.registry is None:
            return
        try:
            mtime = os.stat(self.registry.root).st_mtime_ns
        except OSError:
            return
        if mtime == self._dir_mtime and time.time_ns() - mtime > RESCAN_WINDOW_NS:
            return
        self._dir_mtime = mtime
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
                self.cards[name] = self._persona(name, read_card_file(path), str(path))
                log.info("card registry: serving %s", name)
            except (CardError, ConfigError) as e:
                self.cards.pop(name, None)
                log.warning("card registry: %s is not served: %s", name, e)

    def get(self, name: str) -> Persona | None:
        """The character named ``name``; an unknown name rescans the registry first."""
        found = self.yaml.get(name) or self.cards.get(name)
        if found is None and self.registry is not None and NAME.match(name):
            self.refresh()
            found = self.cards.get(name)
        return found

    def all(self) -> list[Persona]:
        self.refresh()
        return [*self.yaml.values(), *self.cards.values()]

    def import_card(self, raw: bytes, adapter: str | None = None, name: str | None = None) -> CardPersona:
        """Validate an uploaded card file (JSON or PNG), bind it to ``adapter`` when given, add it to the registry
        under ``name`` (default: the character's name as a slug) and serve it; an ``APIError`` says what is wrong
        (409: no registry configured, or the name is taken)."""
        if self.registry is None:
            raise APIError(
                409,
                "this app has no card registry to import into: set card_registry (a folder) in the serve config's args",
                code="no_card_registry",
            )
        if adapter is not None and adapter not in self.cfg.adapters:
            raise APIError(
                400, f"adapter {adapter!r} is not served (adapters: {sorted(self.cfg.adapters)})", param="adapter"
            )
        try:
            card = parse_card(raw, UPLOAD)
            if adapter is not None:
                card = with_rp_settings(card, adapter=adapter, source=UPLOAD)
        except CardError as e:
            raise APIError(400, str(e), code="invalid_card") from None
        try:
            name = slugify(card.name) if name is None else check_name(name)
        except CardError as e:
            raise APIError(400, str(e), param="name") from None
        self.refresh()
        if name in self.taken or name in self.cards or self.registry.path(name).exists():
            what = self.taken.get(name, "an imported card")
            raise APIError(
                409,
                f"the name {name!r} is taken by {what}; import the card under another name (?name=NAME)",
                param="name",
                code="name_taken",
            )
        try:
            persona = self._persona(name, card, UPLOAD)
        except (CardError, ConfigError) as e:
            raise APIError(400, str(e), code="invalid_card") from None
        try:
            self.registry.add(card, name, image=raw if is_png(raw) else None)
        except CardError as e:
            raise APIError(409, str(e), param="name", code="name_taken") from None
        self.cards[name] = persona
        self._files[name] = self._mtime(name) or 0
        log.info("card registry: imported %s (%s)", name, card.spec)
        return persona
