"""One replica's OpenAI-compatible API: the chat, completion and tokenize endpoints over one ``Serving`` state."""

from __future__ import annotations

from rp_ray.serve.chat import ChatEndpoint
from rp_ray.serve.completion import CompletionEndpoint
from rp_ray.serve.tokenization import TokenizeEndpoint


class ChatServing(ChatEndpoint, CompletionEndpoint, TokenizeEndpoint):
    """Every endpoint's serving logic for one serve config and its characters (``Serving``'s arguments)."""
