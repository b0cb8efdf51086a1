"""A terminal chat with a running rp_ray app over its OpenAI API: ``rp-ray chat --model haruhi``; with a message
(``rp-ray chat --model haruhi "hi"``) it prints the one reply and exits, and ``--list`` lists the served models.

Replies stream to the terminal token by token; a character's greeting (``GET /v1/models``) opens the chat. The
history stays within the served context: before each message the oldest turns are dropped until the prompt plus
``--max-tokens`` fits, counted by the server (``POST /tokenize`` with the messages, the card applied as chat applies
it) or, when it cannot count, estimated from the text's UTF-8 bytes (at least one byte a token). Errors (server
down, wrong key, unknown model, a refused request) are one line each, never a traceback. Commands: :data:`HELP`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "RP_RAY_API_KEY"
DEFAULT_CONTEXT = 4096  # when the server does not say (no /tokenize)
MAX_MESSAGES = 1000  # the serve config's default max_messages
PER_MESSAGE_TOKENS = 8  # what a chat template adds around one message, for the estimate
HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system message (/system shows it, /system - drops it: a character's own applies)
  /model NAME     talk to another model or character (/model lists them)
  /help           this list
  /exit           quit (or Ctrl-D)
a line starting with // is sent with one / less"""

Messages = list[dict[str, str]]


class ChatError(Exception):
    """A failure the user should read as one line (the server is down, the key is wrong, ...)."""


def server_root(base_url: str) -> str:
    """The app's root URL from what a user may type: with or without a trailing ``/`` or ``/v1``."""
    url = base_url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def read_api_key(key_file: str | None, env: dict[str, str] | None = None) -> str:
    """The key from ``--api-key-file``, else from ``$RP_RAY_API_KEY``; a ``ChatError`` says how to give one."""
    env = os.environ if env is None else env
    if key_file:
        p = Path(key_file).expanduser()
        if not p.is_file():
            raise ChatError(f"API key file {p} does not exist")
        key = p.read_text(encoding="utf-8").strip()
        if not key:
            raise ChatError(f"API key file {p} is empty")
        return key
    key = env.get(API_KEY_ENV, "").strip()
    if not key:
        raise ChatError(f"no API key: pass --api-key-file FILE or set {API_KEY_ENV}")
    return key


def build_messages(system: str | None, history: Messages) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


def estimate_tokens(messages: Messages) -> int:
    """A count no tokenizer beats by much: one token per UTF-8 byte (a byte-level BPE token holds at least one)
    plus the template's markers."""
    return sum(len(m["content"].encode("utf-8")) + PER_MESSAGE_TOKENS for m in messages) + 1


def trim_history(
    system: str | None,
    history: Messages,
    count: Callable[[Messages], int],
    budget: int,
    max_messages: int = MAX_MESSAGES,
) -> tuple[Messages, int]:
    """The history without its oldest turns (a user message and its reply) until the prompt holds at most
    ``budget`` tokens (as ``count`` counts the messages) and ``max_messages`` messages; (kept, turns dropped).

    The last message, the one being sent, is always kept: if it alone is too long, the server says so."""
    kept, dropped = list(history), 0
    while len(kept) > 1:
        messages = build_messages(system, kept)
        if len(messages) <= max_messages and count(messages) <= budget:
            break
        cut = 2 if len(kept) > 2 and kept[0]["role"] == "user" and kept[1]["role"] == "assistant" else 1
        kept, dropped = kept[cut:], dropped + 1
    return kept, dropped


def parse_command(line: str) -> tuple[str, str] | None:
    """``("/name", "rest")`` for a command line, None for a message (``//x`` is the message ``/x``)."""
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, arg = line.partition(" ")
    return name.lower(), arg.strip()


# control characters a model may write (escape sequences, carriage returns) are shown, not obeyed by the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """``text`` as the terminal shows it: control characters other than newline and tab written as ``\\xNN``."""
    return text.translate(_CONTROL)


def message_text(line: str) -> str:
    return line[1:] if line.startswith("//") else line


def describe_error(e: Exception, base_url: str) -> str:
    """One line for a failed call to the server."""
    import openai

    if isinstance(e, ChatError):
        return str(e)
    if isinstance(e, openai.APITimeoutError):
        return f"the server at {base_url} did not answer in time"
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the server at {base_url} (is it running? `serve run serve_configs/tiny_llama3.yaml`)"
    if isinstance(e, openai.AuthenticationError):
        return f"the server refused the API key (check --api-key-file or ${API_KEY_ENV})"
    if isinstance(e, openai.APIStatusError):
        return f"the server answered {e.status_code}: {_server_message(e)}"
    if isinstance(e, openai.APIError):
        return f"the reply failed: {e.message}"
    return f"{type(e).__name__}: {e}"


def _server_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))


def stream_reply(client, model: str, messages: Messages, kw: dict[str, Any], out: TextIO) -> str:
    """Stream a chat completion's text to ``out`` (terminal escapes made visible); the whole reply."""
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **kw)
    parts: list[str] = []
    try:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
                    out.write(printable(choice.delta.content))
                    out.flush()
    finally:
        stream.close()
    return "".join(parts)


def sampling_kwargs(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    """Only what the user set: everything else is the card's or the server's default."""
    kw: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens is not None else {}
    return kw | ({"temperature": temperature} if temperature is not None else {})


@dataclass
class ChatSession:
    """The chat's state: the model (its id, the name replies are labelled with: a character's display name, else the
    id, and its greeting), the system message, the history."""

    model: str
    name: str
    greeting: str
    system: str | None = None
    history: Messages = field(default_factory=list)


class ChatREPL:
    """Reads lines, runs commands, streams replies. ``client`` is an ``openai.OpenAI``; ``tokenize`` posts to the
    server's ``/tokenize`` (None: estimate only)."""

    def __init__(
        self,
        client,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int = 256,
        tokenize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        out: TextIO = sys.stdout,
        read: Callable[[str], str] = input,
    ):
        self.client = client
        self.base_url = base_url
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.tokenize = tokenize
        self.out = out
        self.read = read
        self.session = ChatSession(*self.lookup(model), system)
        self.context = self._context()

    def models(self) -> list[Any]:
        return list(self.client.models.list().data)

    def lookup(self, name: str) -> tuple[str, str, str]:
        """(id, name, greeting) of the model ``name`` as the server lists it; a ``ChatError`` naming the served ones
        if it has none."""
        models = self.models()
        m = next((m for m in models if m.id == name), None)
        if m is None:
            raise ChatError(f"no model {name!r} on the server; it serves: {', '.join(x.id for x in models)}")
        return m.id, getattr(m, "display_name", None) or m.id, getattr(m, "greeting", None) or ""

    def _ask_tokenize(self, body: dict[str, Any], key: str, default: int) -> int:
        """``key`` of the server's ``/tokenize`` answer for the current model; ``default`` when it cannot say."""
        try:
            return int(self.tokenize({"model": self.session.model, **body})[key]) if self.tokenize else default
        except Exception:  # noqa: BLE001 -- a server without /tokenize: the default
            return default

    def _context(self) -> int:
        return self._ask_tokenize({"prompt": ""}, "max_model_len", DEFAULT_CONTEXT)

    def count(self, messages: Messages) -> int:
        """Prompt tokens of ``messages`` as the server builds the prompt; estimated when it cannot count."""
        return self._ask_tokenize({"messages": messages}, "count", estimate_tokens(messages))

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def error(self, e: Exception) -> None:
        self.say(f"error: {describe_error(e, self.base_url)}")

    def greeting(self) -> None:
        s = self.session
        if s.greeting:
            self.say(f"{s.name}> {printable(s.greeting)}")

    def handle(self, line: str) -> bool:
        """Run one input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        cmd = parse_command(line)
        if cmd is None:
            self.send(message_text(line))
            return True
        name, arg = cmd
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.session.history.clear()
            self.say("(history cleared)")
        elif name == "/system":
            if not arg:
                self.say(f"(system: {self.session.system!r})" if self.session.system else "(no system message)")
            else:
                self.session.system = None if arg == "-" else arg
                self.say("(system message dropped)" if arg == "-" else "(system message set)")
        elif name == "/model":
            self.switch(arg)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def switch(self, name: str) -> None:
        try:
            if not name:
                self.say("models: " + ", ".join(m.id for m in self.models()))
                return
            s = self.session
            s.model, s.name, s.greeting = self.lookup(name)
        except Exception as e:  # noqa: BLE001 -- reported, the chat goes on with the old model
            self.error(e)
            return
        self.context = self._context()
        self.say(f"(switched to {name}; the history is kept)")
        self.greeting()

    def send(self, text: str) -> None:
        """Send a message with the history that fits, stream the reply, keep both when it succeeds."""
        s = self.session
        budget = max(1, self.context - self.max_tokens)
        history, dropped = trim_history(s.system, [*s.history, {"role": "user", "content": text}], self.count, budget)
        if dropped:
            self.say(f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the context)")
        kw = sampling_kwargs(self.temperature, self.max_tokens)
        self.out.write(f"{s.name}> ")
        self.out.flush()
        try:
            reply = stream_reply(self.client, s.model, build_messages(s.system, history), kw, self.out)
        except KeyboardInterrupt:
            self.say("\n(reply interrupted; not kept)")
            return
        except Exception as e:  # noqa: BLE001 -- one line, the chat goes on
            self.say()
            self.error(e)
            return
        self.say()
        s.history = [*history, {"role": "assistant", "content": reply}]

    def run(self) -> int:
        """The loop: the greeting, then a line at a time until /exit or end of input (Ctrl-D)."""
        self.say(f"[{self.session.model}] /help for commands, /exit or Ctrl-D to quit")
        self.greeting()
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                self.say()
                break
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /exit to quit)")
                continue
            if not self.handle(line):
                break
        self.say("bye")
        return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``chat`` subcommand on an ``add_subparsers()`` object; it runs :func:`run_chat`."""
    p = sub.add_parser("chat", help="chat with a served model or character in the terminal (streams replies)")
    p.add_argument("message", nargs="?", help="send this one message, print the reply and exit (no REPL)")
    p.add_argument("--model", help="a character, an adapter or the base model (GET /v1/models; --list)")
    p.add_argument("--list", action="store_true", help="list the served models and characters, then exit")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the app's URL (default {DEFAULT_BASE_URL})")
    p.add_argument("--api-key-file", help=f"file holding the API key (default: ${API_KEY_ENV})")
    p.add_argument("--system", help="system message (default: none, so a character's own applies)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's or card's)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server (default 120)")
    p.set_defaults(func=run_chat)
    return p


def one_shot(client, args: argparse.Namespace, root: str) -> int:
    """``--list`` (id, kind, display name; tab-separated), or one message whose reply streams to stdout; 1 with the
    reason on stderr when the server refuses."""
    try:
        if args.list:
            for m in client.models.list().data:
                print(f"{m.id}\t{getattr(m, 'kind', '')}\t{getattr(m, 'display_name', '') or ''}")
            return 0
        messages = build_messages(args.system, [{"role": "user", "content": args.message}])
        stream_reply(client, args.model, messages, sampling_kwargs(args.temperature, args.max_tokens), sys.stdout)
        print()
        return 0
    except Exception as e:  # noqa: BLE001 -- one line, no traceback
        print(f"error: {describe_error(e, root)}", file=sys.stderr)
        return 1


def run_chat(args: argparse.Namespace) -> int:
    """Start the chat; the exit status: 0 after /exit or Ctrl-D, 2 when it cannot start (the reason printed).
    With a message or ``--list``: :func:`one_shot`."""
    import httpx
    from openai import OpenAI

    root = server_root(args.base_url)
    if args.model is None and not args.list:
        print("error: name a --model (a character, an adapter or the base model; --list shows them)", file=sys.stderr)
        return 2
    try:
        key = read_api_key(args.api_key_file)
        client = OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=args.timeout)
        if args.list or args.message:
            return one_shot(client, args, root)
        http = httpx.Client(base_url=root, headers={"Authorization": f"Bearer {key}"}, timeout=args.timeout)

        def tokenize(body: dict[str, Any]) -> dict[str, Any]:
            r = http.post("/tokenize", json=body)
            r.raise_for_status()
            return r.json()

        repl = ChatREPL(
            client,
            args.model,
            base_url=root,
            system=args.system,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            tokenize=tokenize,
        )
    except Exception as e:  # noqa: BLE001 -- one line, no traceback
        print(f"error: {describe_error(e, root)}", file=sys.stderr)
        return 2
    try:
        import readline  # noqa: F401 -- line editing and history for input()
    except ImportError:
        pass
    return repl.run()
