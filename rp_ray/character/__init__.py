"""Characters the way role-play users bring them: Character Card V2/V3 (JSON or PNG), lorebooks, prompt assembly
and ChatHaruhi-style scene memory. Pure Python (no Ray, no engine); serving imports it, never the reverse.

- ``card``: models, reading/writing cards (``read_card_file``, ``parse_card``, ``card_to_json``,
  ``write_card_png``), rp_ray's adapter + sampling binding in ``data.extensions["rp_ray"]``, ``CardRegistry``.
- ``png``: PNG text chunks (stdlib only).
- ``lorebook``: which entries a chat brings in (``activate``), standalone lorebook files.
- ``prompt``: chat-completion messages for a card (``build_messages``, ``greetings``).
- ``scenes``: ChatHaruhi system prompts (persona + classic scenes), scene corpora and BM25 retrieval.
"""

from rp_ray.character.card import (
    BookEntry,
    Card,
    CardData,
    CardDataV3,
    CardError,
    CardRegistry,
    Lorebook,
    RpRaySettings,
    Sampling,
    card_to_json,
    parse_card,
    read_card_file,
    rp_settings,
    with_rp_settings,
    write_card_png,
)
from rp_ray.character.lorebook import activate, entry_text, load_lorebook_file
from rp_ray.character.prompt import DEFAULT_SYSTEM, apply_macros, build_messages, greetings, system_prompt
from rp_ray.character.scenes import (
    SceneIndex,
    build_system_prompt,
    extract_scenes,
    load_scene_corpus,
    split_system_prompt,
)

__all__ = [
    "DEFAULT_SYSTEM",
    "BookEntry",
    "Card",
    "CardData",
    "CardDataV3",
    "CardError",
    "CardRegistry",
    "Lorebook",
    "RpRaySettings",
    "Sampling",
    "SceneIndex",
    "activate",
    "apply_macros",
    "build_messages",
    "build_system_prompt",
    "card_to_json",
    "entry_text",
    "extract_scenes",
    "greetings",
    "load_lorebook_file",
    "load_scene_corpus",
    "parse_card",
    "read_card_file",
    "rp_settings",
    "split_system_prompt",
    "system_prompt",
    "with_rp_settings",
    "write_card_png",
]
