"""Raw generated text (special tokens kept) to the clean reply a chat user sees, also while it streams."""

from __future__ import annotations

from rp_ray.template import Template, clean_reply


class ReplyStream:
    """Accumulates raw deltas of one choice and hands out clean deltas whose concatenation is the final reply.

    The clean text of the raw text so far is recomputed on every delta (gpt-oss: the final channel only; llama3:
    cut at stop words, stripped); only what extends the already-sent prefix goes out, so whitespace that the
    final strip removes is never sent, and gpt-oss reasoning never reaches the client.
    """

    def __init__(self, tpl: Template):
        self.tpl = tpl
        self.raw = ""
        self.sent = ""
        self.tokens = 0
        self.finish_reason: str | None = None

    def feed(self, text: str, tokens: int = 0, finish_reason: str | None = None) -> str:
        self.raw += text
        self.tokens += tokens
        self.finish_reason = finish_reason or self.finish_reason
        clean = clean_reply(self.tpl, self.raw)
        if not clean.startswith(self.sent):
            return ""  # cannot happen with the templates' cleaning; never resend what the client already has
        delta, self.sent = clean[len(self.sent):], clean
        return delta

    @property
    def text(self) -> str:
        """The full clean reply (equal to the concatenated deltas)."""
        return self.sent
