"""A card's prompt, assembled the way SillyTavern does for a chat-completion backend, and the typed ``Prompt`` a
served chat is built from.

``build_messages`` gives, in order:

1. one system message whose parts, each skipped when empty and joined by a blank line, are: the card's
   ``system_prompt`` with ``{{original}}`` replaced by ``default_system`` (or ``default_system`` when the card has
   none); the lorebook entries positioned ``before_char`` (the default position); ``description``;
   ``"{{char}}'s personality: " + personality``; ``"Scenario: " + scenario``; the ``after_char`` entries; the scene
   memory in ChatHaruhi's layout (``"Classic scenes for the role are as follows:\\n"`` + scenes joined by
   ``"\\n###\\n"``, so a card whose only text is a ChatHaruhi persona gives exactly the data's system prompt); the
   example messages (``mes_example`` split on ``<START>``, each block as ``"[Example Chat]\\n" + block``);
2. the chat history as given, with the Character's Note (``extensions.depth_prompt``: ``prompt``, ``depth``,
   ``role``) inserted ``depth`` messages from its end;
3. ``post_history_instructions`` (``{{original}}`` -> ``default_post_history``; ``default_post_history`` when the
   card has none) as a final system message, when not empty.

``creator_notes`` never reach a prompt. Macros are replaced in every text, history included: ``{{char}}`` (the
card's name), ``{{user}}`` (``user_name``), and the legacy ``<BOT>`` / ``<USER>``; macro names are matched
case-insensitively, as SillyTavern does, in one pass (a name holding ``{{user}}`` is not expanded again). Every macro
may become a name of up to 256 characters, so serving bounds what they add (``macro_growth``): at most the card JSON
limit to a card's texts and lorebooks (``card_macro_texts``), and a chat's messages to ``max_body_bytes`` characters
once expanded. ``greetings`` gives ``[first_mes, *alternate_greetings]`` (empty ones dropped) with macros applied.

A served chat (``Prompt``) is the system text of part 1 and the messages of parts 2 and 3 (``card_turns``), laid
out by the chat template message by message. A request whose messages start with system messages keeps them
(``leading_system``) as its whole system prompt; later system messages stay where they stand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rp_ray.character.card import BookEntry, Card, Lorebook
from rp_ray.character.lorebook import entry_text
from rp_ray.character.scenes import SCENE_SEP, SCENES_HEADER
from rp_ray.data import Message

DEFAULT_SYSTEM = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}. Stay in character, keep the "
    "reply short and in the language of the chat."
)
SCENES_TITLE = SCENES_HEADER.lstrip("\n")
EXAMPLE_TITLE = "[Example Chat]"
START = re.compile(r"<start>", re.IGNORECASE)
# one pass for both macros, so a name holding {{user}} is not expanded again
_MACRO = re.compile(r"(\{\{char\}\}|<bot>)|\{\{user\}\}|<user>", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{original\}\}", re.IGNORECASE)


class Turn(Protocol):
    """A chat message as a request brings it (serving's pydantic messages, ``rp_ray.data.Message``)."""

    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """What a chat prompt is made of: the system text and the turns the template lays out, and (for ``rp_debug``)
    the lorebook entries and scenes that went in."""

    system: str
    turns: list[Message]
    lore: tuple[dict[str, Any], ...] = ()
    scenes: tuple[str, ...] = ()

    def debug(self) -> dict[str, Any]:
        """The ``rp_ray`` field of a response to a request with ``rp_debug: true``."""
        return {"lore": list(self.lore), "scenes": list(self.scenes), "system_prompt": self.system}


def leading_system(messages: Sequence[Turn]) -> tuple[bool, str, list[Message]]:
    """(whether the messages start with system messages, those joined by blank lines (empty ones skipped), the
    messages after them, later system messages included)."""
    lead = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    system = "\n\n".join(m.content for m in messages[:lead] if m.content)
    return lead > 0, system, [Message(m.role, m.content) for m in messages[lead:]]


def apply_macros(text: str, char: str, user: str = "User") -> str:
    """``{{char}}`` / ``<BOT>`` -> ``char``, ``{{user}}`` / ``<USER>`` -> ``user`` (case-insensitive)."""
    return _MACRO.sub(lambda m: char if m.group(1) else user, text)


def macro_growth(texts: Iterable[str], char: str, user: str = "User") -> int:
    """How many characters ``apply_macros`` adds to ``texts`` (counted without building them): what a caller bounds
    before expanding text it does not control, since each macro may become a name of up to 256 characters."""
    grow_char, grow_user = len(char), len(user)
    total = 0
    for text in texts:
        for m in _MACRO.finditer(text):
            total += (grow_char if m.group(1) else grow_user) - (m.end() - m.start())
    return total


def card_macro_texts(card: Card, books: Iterable[Lorebook] = ()) -> Iterator[str]:
    """Every text of a card (and of the lorebooks it is served with) that its prompts and greetings expand macros
    in."""
    d = card.data
    yield from (d.system_prompt, d.description, d.personality, d.scenario, d.mes_example)
    yield from (d.post_history_instructions, d.first_mes, *d.alternate_greetings)
    note = depth_prompt(card)
    if note is not None:
        yield note[0]
    for book in books:
        yield from (e.content for e in book.entries)


def _original(text: str, default: str) -> str:
    return _ORIGINAL.sub(lambda _: default, text)


def example_blocks(mes_example: str) -> list[str]:
    """The ``<START>``-separated example dialogues, stripped, empty ones dropped."""
    return [b.strip() for b in START.split(mes_example) if b.strip()]


def _lore_text(item: BookEntry | str) -> str:
    return entry_text(item) if isinstance(item, BookEntry) else item


def _after(item: BookEntry | str) -> bool:
    return isinstance(item, BookEntry) and item.position == "after_char"


def system_prompt(
    card: Card,
    *,
    user_name: str = "User",
    default_system: str = DEFAULT_SYSTEM,
    lore: Sequence[BookEntry | str] = (),
    scenes: Sequence[str] = (),
) -> str:
    """The system message's text (part 1 of ``build_messages``); a plain string in ``lore`` is placed before_char."""
    d = card.data
    head = _original(d.system_prompt, default_system) if d.system_prompt.strip() else default_system
    parts = [
        head,
        *(_lore_text(e) for e in lore if not _after(e)),
        d.description,
        f"{{{{char}}}}'s personality: {d.personality}" if d.personality.strip() else "",
        f"Scenario: {d.scenario}" if d.scenario.strip() else "",
        *(_lore_text(e) for e in lore if _after(e)),
        SCENES_TITLE + SCENE_SEP.join(scenes) if scenes else "",
        *(f"{EXAMPLE_TITLE}\n{b}" for b in example_blocks(d.mes_example)),
    ]
    text = "\n\n".join(p for p in parts if p.strip())
    return apply_macros(text, card.name, user_name)


def build_messages(
    card: Card,
    history: Sequence[Mapping[str, Any] | Any],
    *,
    user_name: str = "User",
    default_system: str = DEFAULT_SYSTEM,
    default_post_history: str = "",
    lore: Sequence[BookEntry | str] = (),
    scenes: Sequence[str] = (),
) -> list[dict[str, str]]:
    """``[system, *history (with the Character's Note), post-history system?]`` as ``{"role", "content"}`` dicts
    (rules in the module docstring). ``history`` items are mappings or objects with ``role`` and ``content``;
    ``lore`` is what ``lorebook.activate`` returned (entries keep their position); ``scenes`` the retrieved scene
    memory, already fitted to its budget (``scenes.fit_scenes``)."""
    system = system_prompt(card, user_name=user_name, default_system=default_system, lore=lore, scenes=scenes)
    turns = [Message(m["role"], m["content"]) if isinstance(m, Mapping) else m for m in history]
    out = [{"role": "system", "content": system}] if system.strip() else []
    return out + [
        {"role": m.role, "content": m.content} for m in card_turns(card, turns, user_name, default_post_history)
    ]


def post_history(card: Card, user_name: str = "User", default_post_history: str = "") -> str | None:
    """The post-history instructions with macros (``{{original}}`` -> ``default_post_history``); None when empty."""
    post = card.data.post_history_instructions
    post = _original(post, default_post_history) if post.strip() else default_post_history
    return apply_macros(post, card.name, user_name) if post.strip() else None


def depth_prompt(card: Card) -> tuple[str, int, str] | None:
    """The Character's Note (``extensions.depth_prompt``) as (text, depth, role), None when the card has none; as
    SillyTavern reads it, a depth that is not a whole number is 4 and a role it does not know is system."""
    note = card.data.extensions.get("depth_prompt")
    if not isinstance(note, dict) or not isinstance(note.get("prompt"), str) or not note["prompt"].strip():
        return None
    depth = note.get("depth")
    depth = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else 4
    role = note.get("role") if note.get("role") in ("system", "user", "assistant") else "system"
    return note["prompt"], depth, role


def card_turns(
    card: Card, turns: Sequence[Turn], user_name: str = "User", default_post_history: str = ""
) -> list[Message]:
    """The chat history with macros applied, the Character's Note ``depth`` messages from its end and the
    post-history instructions after it."""
    out = [Message(m.role, apply_macros(m.content, card.name, user_name)) for m in turns]
    note = depth_prompt(card)
    if note is not None:
        text, depth, role = note
        out.insert(max(0, len(out) - depth), Message(role, apply_macros(text, card.name, user_name)))
    post = post_history(card, user_name, default_post_history)
    if post is not None:
        out.append(Message("system", post))
    return out


def greetings(card: Card, user_name: str = "User") -> list[str]:
    """``[first_mes, *alternate_greetings]`` with macros, empty ones dropped."""
    d = card.data
    return [apply_macros(g, card.name, user_name) for g in [d.first_mes, *d.alternate_greetings] if g.strip()]
