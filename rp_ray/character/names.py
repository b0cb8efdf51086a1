"""The one rule for a name a request's ``model`` can be: the base model's, a served adapter's, a character's (an
imported card's registry name is its file name too). A full match: nothing before or after it, no trailing newline.
Imports nothing of rp_ray, so the config models use it as well."""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit"


def is_name(text: str) -> bool:
    return NAME.fullmatch(text) is not None


def valid_name(text: str) -> str:
    """The rule as a pydantic validator."""
    if not is_name(text):
        raise ValueError(NAME_RULE)
    return text
