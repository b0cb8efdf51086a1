"""Reply cleaning: only the final channel of gpt-oss output and the text before Llama-3's stop words reach a user
or a metric, whole or streamed."""

from __future__ import annotations

import pytest

from rp_ray.llm.reply import ReplyStream, clean_reply, parse_harmony
from rp_ray.llm.template import GPT_OSS, LLAMA3


@pytest.mark.parametrize(
    "raw, want",
    [
        ("「哼」<|end|>", "「哼」"),  # thinking off: prompt opened the final channel
        ("「哼」<|return|>", "「哼」"),
        ("「哼」", "「哼」"),
        (
            "<|channel|>analysis<|message|>想一想<|end|><|start|>assistant<|channel|>final<|message|>「哼」<|return|>",
            "「哼」",
        ),
        ("<|channel|>analysis<|message|>想一想，还没想完", ""),  # reasoning cut off: no answer, never the reasoning
        ("analysis想一想assistantfinal「哼」", "「哼」"),  # special tokens stripped by a decoder
        ("analysis of the plot", "analysis of the plot"),  # a real reply that starts with the word
    ],
)
def test_parse_harmony(raw, want):
    assert parse_harmony(raw) == want
    assert clean_reply(GPT_OSS, raw) == want


def test_clean_reply_llama3():
    assert clean_reply(LLAMA3, "「哼」<|eot_id|>junk") == "「哼」"


def test_streamed_reply_deltas_concatenate_to_the_clean_reply():
    for tpl, pieces in [
        (LLAMA3, [" ", "「你", "好", "」 ", " \n", "再见", "  "]),
        (
            GPT_OSS,
            [
                "<|channel|>",
                "analysis",
                "<|message|>",
                "想一想",
                "<|end|>",
                "<|start|>assistant",
                "<|channel|>",
                "final",
                "<|message|>",
                "「你",
                "好」",
                " ",
            ],
        ),
    ]:
        s = ReplyStream(tpl)
        deltas = [s.feed(p, 1) for p in pieces]
        assert "".join(deltas) == s.text == clean_reply(tpl, "".join(pieces))
        assert s.tokens == len(pieces)
        assert not any("<|" in d or "想" in d for d in deltas)  # no markers, no reasoning
    assert "".join(deltas) == "「你好」"
