"""Raw generated text (special tokens kept) to the clean reply a user or a metric sees, also while it streams.

gpt-oss writes harmony: reasoning in an ``analysis`` channel, then the answer in the ``final`` channel. Only the
final channel is a reply; literal ``analysis...assistantfinal`` text (harmony whose special tokens a decoder
stripped) must never reach a score or a chat reply. Llama-3 replies are cut at their stop words.
"""

from __future__ import annotations

import re

from rp_ray.llm.template import Template

_END_MARKERS = ("<|end|>", "<|return|>", "<|call|>")
_FINAL = "<|channel|>final<|message|>"
# what harmony text looks like once its special tokens were stripped by a decoder
_STRIPPED_REASONING = re.compile(r"^\s*analysis.*?assistantfinal", re.DOTALL)


def parse_harmony(text: str) -> str:
    """The clean final-channel reply of gpt-oss output.

    Accepts text decoded with special tokens kept (preferred): the reply is what follows the last
    ``<|channel|>final<|message|>`` (or the whole text when the prompt already opened the final channel), cut at
    ``<|end|>``/``<|return|>``/``<|call|>``. Reasoning that never reached a final channel yields "". Text whose special
    tokens were stripped (``analysis...assistantfinal...``) is cleaned too.
    """
    if _FINAL in text:
        text = text.rsplit(_FINAL, 1)[1]
    elif text.lstrip().startswith("<|channel|>"):
        return ""  # reasoning or another channel, no final answer
    elif _STRIPPED_REASONING.match(text):
        return _STRIPPED_REASONING.sub("", text, count=1).strip()
    cut = min((text.find(m) for m in _END_MARKERS if m in text), default=len(text))
    return text[:cut].strip()


def clean_reply(tpl: Template, text: str) -> str:
    """Generated text (special tokens kept) to the reply a user or a metric sees."""
    if tpl.name == "gpt_oss":
        return parse_harmony(text)
    for w in (*tpl.stop_words, "<|end_of_text|>"):
        text = text.split(w, 1)[0]
    return text.strip()


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
        delta, self.sent = clean[len(self.sent) :], clean
        return delta

    @property
    def text(self) -> str:
        """The full clean reply (equal to the concatenated deltas)."""
        return self.sent
