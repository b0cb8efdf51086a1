"""The API key: read from an environment variable or a file (never from the repo), checked on every request.

Clients send ``Authorization: Bearer <key>`` (the OpenAI clients do). Browsers opening the chat page may use
HTTP Basic auth with the key as password (any user name): the page at ``/`` answers 401 with a Basic challenge,
so the browser asks once and then sends the key with the page's own API calls. ``RequireKey`` is the ASGI
middleware that checks it on every route but ``/health``.

A browser resends Basic credentials by itself, also with a request another site's page makes, so ``SameOrigin``
refuses every write request (POST, PUT, PATCH, DELETE) whose ``Origin`` header is not the server's own origin (its
scheme, host and port as the request's ``Host`` names them, or ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` behind a
proxy: headers another site's page cannot set without a CORS preflight this app never grants). Clients that send
no ``Origin`` (the openai package, SillyTavern's server) are not concerned; the routes' Content-Type rules
(``app.py``) keep out the HTML form posts that browsers send without a preflight.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from pathlib import Path
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from rp_ray.serve.protocol import APIError

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


OPEN_PATHS = {"/health"}


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, code=code).body(), status_code=status, headers=headers)


class RequireKey:
    """ASGI middleware: every route but ``/health`` needs the API key (``Authorization: Bearer <key>``, or Basic
    auth with the key as password, which is how a browser opening the chat page sends it).

    A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` passes every
    chunk of a streamed reply through a memory stream and a task of its own.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root) :] if root and path.startswith(root) else path  # the path within the app
        if route in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        presented = presented_key(authorization.decode("latin-1") if authorization is not None else None)
        key = getattr(scope["app"].state, "api_key", None) if "app" in scope else None
        if presented is None:
            # the page is opened by a browser: ask it for the key (Basic auth, key as password)
            challenge = 'Basic realm="rp_ray", charset="UTF-8"' if route in ("", "/") else "Bearer"
            response = error_response(
                401,
                "missing API key: send `Authorization: Bearer <key>`",
                "authentication_error",
                "missing_api_key",
                {"WWW-Authenticate": challenge},
            )
        elif key is None or not key_matches(presented, key):
            response = error_response(401, "invalid API key", "authentication_error", "invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header's first value (a forwarded header's first hop), None when absent."""
    value = next((v for k, v in scope["headers"] if k == name), None)
    return None if value is None else value.decode("latin-1").split(",")[0].strip()


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin (``https://host[:port]``), the scheme's port when none is given; None for
    what is no origin (``null``, a bare word)."""
    try:
        url = urlsplit(origin.strip())
        scheme, host, port = url.scheme.lower(), url.hostname, url.port
    except ValueError:  # a port that is no number
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host.lower(), port or DEFAULT_PORTS[scheme]


def own_origin(scope: Scope) -> str:
    """The origin the client reached: the scheme and the Host header, as a proxy in front reports them."""
    scheme = _header(scope, b"x-forwarded-proto") or scope.get("scheme", "http")
    host = _header(scope, b"x-forwarded-host") or _header(scope, b"host") or ""
    return f"{scheme}://{host}"


class SameOrigin:
    """ASGI middleware: a write request with an ``Origin`` header naming another site is refused with 403 (see the
    module docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        own = own_origin(scope)
        if origin is None or (origin_key(origin) is not None and origin_key(origin) == origin_key(own)):
            return await self.app(scope, receive, send)
        response = error_response(
            403,
            f"cross-site request refused: its Origin {origin!r} is not this server's origin {own!r}; call the API "
            "from the server's own chat page, or from a client that sends no Origin header (such as the openai "
            "package or SillyTavern's server)",
            "permission_error",
            "cross_origin_request",
        )
        await response(scope, receive, send)
