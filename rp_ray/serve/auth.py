"""The API key: read from an environment variable or a file (never from the repo), checked on every request.

Clients send ``Authorization: Bearer <key>`` (the OpenAI clients do). Browsers opening the chat page may use
HTTP Basic auth with the key as password (any user name): the page at ``/`` answers 401 with a Basic challenge,
so the browser asks once and then sends the key with the page's own API calls.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from pathlib import Path

MIN_KEY_LEN = 8


class AuthSetupError(ValueError):
    """No usable API key is configured; the message says how to set one."""


def load_api_key(env_var: str, key_file: str | None) -> str:
    key = os.environ.get(env_var, "").strip()
    if not key and key_file:
        p = Path(key_file)
        if not p.is_file():
            raise AuthSetupError(f"api_key_file {p} does not exist")
        key = p.read_text(encoding="utf-8").strip()
    if not key:
        where = f"the environment variable {env_var}" + (f" or the file {key_file}" if key_file else "")
        raise AuthSetupError(
            f"no API key: set {where} on the machines running the app "
            f"(e.g. export {env_var}=$(openssl rand -hex 16) "
            "before `ray start` / `serve run`)"
        )
    if len(key) < MIN_KEY_LEN:
        raise AuthSetupError(f"the API key is {len(key)} characters; use at least {MIN_KEY_LEN}")
    return key


def presented_key(authorization: str | None) -> str | None:
    """The key carried by an Authorization header (Bearer, or Basic with the key as password); None if none."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def key_matches(presented: str, key: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), key.encode("utf-8"))
