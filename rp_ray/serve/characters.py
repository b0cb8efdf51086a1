"""Character cards and the adapter folders they point at.

A card names a character, its system prompt, the served adapter it speaks
through, a greeting and default sampling. Adapter folders are resolved only
inside the configured adapter root, only as peft folders with safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rp_ray.config import ConfigError
from rp_ray.serve.protocol import ChatMessage

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CardError(ValueError):
    """A character file or adapter folder that cannot be served; the message says what to fix."""


class CardSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)


class CharacterCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME.pattern, description="The `model` a request names to talk to this character.")
    display_name: str = Field(min_length=1, description="Shown in the chat page.")
    system_prompt: str = Field(min_length=1, description="Used unless the request brings its own system message.")
    adapter: str | None = Field(
        None, description="Served adapter name (a key of the serve config's adapters); None = base."
    )
    greeting: str = Field("", description="First line shown in the chat page.")
    sampling: CardSampling = Field(default_factory=CardSampling)


def load_cards(path: str | Path) -> dict[str, CharacterCard]:
    """Cards from a YAML or JSON file holding a list of cards (or ``{"characters": [...]}``)."""
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
    cards: dict[str, CharacterCard] = {}
    for i, item in enumerate(raw):
        try:
            card = CharacterCard.model_validate(item)
        except ValidationError as e:
            first = e.errors()[0]
            raise CardError(f"{p}: card {i}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if card.name in cards:
            raise CardError(f"{p}: two cards are named {card.name!r}")
        cards[card.name] = card
    return cards


def check_cards(
    cards: Mapping[str, CharacterCard], served_adapters: Collection[str], reserved: Collection[str]
) -> None:
    """Every card has a name of its own (not ``reserved``: the base model's, nor a served adapter's) and speaks
    through a served adapter or the base model; a ``ConfigError`` says which card does not."""
    for name, card in cards.items():
        if name in reserved or name in served_adapters:
            raise ConfigError(f"character {name!r} has the name of the base model or an adapter")
        if card.adapter is not None and card.adapter not in served_adapters:
            raise ConfigError(
                f"character {name!r} speaks through adapter {card.adapter!r}, which is not in adapters: "
                f"{sorted(served_adapters)}"
            )


def apply_card(card: CharacterCard, messages: list[ChatMessage]) -> list[ChatMessage]:
    """The card's system prompt goes first unless the request already has a system message."""
    if any(m.role == "system" for m in messages):
        return messages
    return [ChatMessage(role="system", content=card.system_prompt), *messages]


def resolve_adapter(root: str | Path, name: str, folder: str) -> Path:
    """The adapter folder ``folder`` under ``root``: a peft folder with safetensors weights, never outside root."""
    if not NAME.match(name):
        raise CardError(
            f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit"
        )
    base = Path(root).resolve()
    path = (base / folder).resolve()
    if path != base and base not in path.parents:
        raise CardError(f"adapter {name!r}: {folder!r} resolves outside the adapter root {base}")
    if not (path / "adapter_config.json").is_file():
        raise CardError(f"adapter {name!r}: {path} is not a peft adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise CardError(f"adapter {name!r}: {path} has no adapter_model.safetensors (pickle weights are refused)")
    return path
