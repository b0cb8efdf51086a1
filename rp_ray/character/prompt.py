"""Chat-completion messages for a card, assembled the way SillyTavern does for a chat-completion backend.

``build_messages`` gives, in order:

1. one system message whose parts, each skipped when empty and joined by a blank line, are: the card's
   ``system_prompt`` with ``{{original}}`` replaced by ``default_system`` (or ``default_system`` when the card has
   none); the lorebook entries positioned ``before_char`` (the default position); ``description``;
   ``"{{char}}'s personality: " + personality``; ``"Scenario: " + scenario``; the ``after_char`` entries; the scene
   memory in ChatHaruhi's layout (``"Classic scenes for the role are as follows:\\n"`` + scenes joined by
   ``"\\n###\\n"``, so a card whose only text is a ChatHaruhi persona gives exactly the data's system prompt); the
   example messages (``mes_example`` split on ``<START>``, each block as ``"[Example Chat]\\n" + block``);
2. the chat history as given;
3. ``post_history_instructions`` (``{{original}}`` -> ``default_post_history``; ``default_post_history`` when the
   card has none) as a final system message, when not empty.

``creator_notes`` never reach a prompt. Macros are replaced in every text, history included: ``{{char}}`` (the
card's name), ``{{user}}`` (``user_name``), and the legacy ``<BOT>`` / ``<USER>``; macro names are matched
case-insensitively, as SillyTavern does. ``greetings`` gives ``[first_mes, *alternate_greetings]`` (empty ones
dropped) with macros applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rp_ray.character.card import BookEntry, Card
from rp_ray.character.lorebook import entry_text
from rp_ray.character.scenes import SCENE_SEP, SCENES_HEADER

DEFAULT_SYSTEM = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}. Stay in character, keep the "
    "reply short and in the language of the chat."
)
SCENES_TITLE = SCENES_HEADER.lstrip("\n")
EXAMPLE_TITLE = "[Example Chat]"
START = re.compile(r"<start>", re.IGNORECASE)
_CHAR = re.compile(r"\{\{char\}\}|<bot>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<user>", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{original\}\}", re.IGNORECASE)


def apply_macros(text: str, char: str, user: str = "User") -> str:
    """``{{char}}`` / ``<BOT>`` -> ``char``, ``{{user}}`` / ``<USER>`` -> ``user`` (case-insensitive)."""
    text = _CHAR.sub(lambda _: char, text)
    return _USER.sub(lambda _: user, text)


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
    """``[system, *history, post-history system?]`` as ``{"role", "content"}`` dicts (rules in the module
    docstring). ``history`` items are mappings or objects with ``role`` and ``content`` (e.g. pydantic messages);
    ``lore`` is what ``lorebook.activate`` returned (entries keep their position); ``scenes`` the retrieved scene
    memory, already fitted to its budget (``scenes.fit_scenes``)."""
    out = []
    system = system_prompt(card, user_name=user_name, default_system=default_system, lore=lore, scenes=scenes)
    if system.strip():
        out.append({"role": "system", "content": system})
    for m in history:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else (m.role, m.content)
        out.append({"role": role, "content": apply_macros(content, card.name, user_name)})
    post = card.data.post_history_instructions
    post = _original(post, default_post_history) if post.strip() else default_post_history
    if post.strip():
        out.append({"role": "system", "content": apply_macros(post, card.name, user_name)})
    return out


def greetings(card: Card, user_name: str = "User") -> list[str]:
    """``[first_mes, *alternate_greetings]`` with macros, empty ones dropped."""
    d = card.data
    return [apply_macros(g, card.name, user_name) for g in [d.first_mes, *d.alternate_greetings] if g.strip()]
