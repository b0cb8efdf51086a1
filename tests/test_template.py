"""Golden tests: the llama3 / gpt_oss templates produce LLaMA-Factory's token layout exactly.

Expected sequences are written out piece by piece below: special tokens by name,
plain text segments through the tokenizer (special tokens split the text, so a
segment between two of them tokenizes on its own). Source of the layouts:
LLaMA-Factory's `llama3` and `gpt` templates (template.py) and its supervised /
unsupervised processors; DESIGN.md §4.
"""

from __future__ import annotations

import pytest

from rp_ray.data import Conversation, Message
from rp_ray.template import (
    GPT_OSS,
    IGNORE_INDEX,
    LLAMA3,
    chat_prompt_ids,
    encode_prediction,
    encode_supervised,
    infer_seqlen,
    stop_token_ids,
)

CONV = Conversation(
    "你是凉宫春日。",
    (
        Message("user", "阿虚:「早」"),
        Message("assistant", "「你又迟到了！」"),
        Message("user", "Kyon: sorry"),
        Message("assistant", "Whatever."),
    ),
)
X = IGNORE_INDEX


def pieces(tok):
    """S(name) -> id of a special token, E(text) -> ids of a plain text segment."""
    return tok.convert_tokens_to_ids, lambda text: tok.encode(text, add_special_tokens=False)


def test_llama3_supervised_golden(llama3_tok):
    S, E = pieces(llama3_tok)
    bos, sh, eh, eot = S("<|begin_of_text|>"), S("<|start_header_id|>"), S("<|end_header_id|>"), S("<|eot_id|>")
    prompt1 = [bos, sh, *E("system"), eh, *E("\n\n你是凉宫春日。"), eot,
               sh, *E("user"), eh, *E("\n\n阿虚:「早」"), eot, sh, *E("assistant"), eh, *E("\n\n")]
    reply1 = [*E("「你又迟到了！」"), eot]
    prompt2 = [sh, *E("user"), eh, *E("\n\nKyon: sorry"), eot, sh, *E("assistant"), eh, *E("\n\n")]
    reply2 = [*E("Whatever."), eot]

    ids, labels = encode_supervised(llama3_tok, LLAMA3, CONV, cutoff_len=2048)

    assert ids == prompt1 + reply1 + prompt2 + reply2
    assert labels == [X] * len(prompt1) + reply1 + [X] * len(prompt2) + reply2
    assert llama3_tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是凉宫春日。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n阿虚:「早」<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "「你又迟到了！」<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nKyon: sorry<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Whatever.<|eot_id|>"
    )


def test_llama3_has_no_default_system(llama3_tok):
    S, E = pieces(llama3_tok)
    conv = Conversation("", (Message("user", "hi"), Message("assistant", "yo")))
    ids, _ = encode_supervised(llama3_tok, LLAMA3, conv, cutoff_len=2048)
    assert ids[:4] == [S("<|begin_of_text|>"), S("<|start_header_id|>"), *E("user"), S("<|end_header_id|>")][:4]
    assert "system" not in llama3_tok.decode(ids)


def test_gpt_oss_supervised_golden_thinking_off(gpt_oss_tok):
    S, E = pieces(gpt_oss_tok)
    st, en, msg, ch, ret = S("<|start|>"), S("<|end|>"), S("<|message|>"), S("<|channel|>"), S("<|return|>")
    empty_thought = [ch, *E("analysis"), msg, en, st, *E("assistant"), ch, *E("final"), msg]
    prompt1 = [st, *E("system"), msg, *E("你是凉宫春日。"), en,
               st, *E("user"), msg, *E("阿虚:「早」"), en, st, *E("assistant"), *empty_thought]
    reply1 = [*E("「你又迟到了！」"), en]
    prompt2 = [st, *E("user"), msg, *E("Kyon: sorry"), en, st, *E("assistant"), *empty_thought]
    reply2 = [*E("Whatever."), en]

    ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048)

    assert ids == prompt1 + reply1 + prompt2 + reply2 + [ret]
    assert labels == [X] * len(prompt1) + reply1 + [X] * len(prompt2) + reply2 + [ret]


def test_gpt_oss_supervised_golden_thinking_on(gpt_oss_tok):
    """LLaMA-Factory's default: the empty analysis block is part of each labelled reply."""
    S, E = pieces(gpt_oss_tok)
    st, en, msg, ch, ret = S("<|start|>"), S("<|end|>"), S("<|message|>"), S("<|channel|>"), S("<|return|>")
    empty_thought = [ch, *E("analysis"), msg, en, st, *E("assistant"), ch, *E("final"), msg]
    prompt1 = [st, *E("system"), msg, *E("你是凉宫春日。"), en, st, *E("user"), msg, *E("阿虚:「早」"), en, st, *E("assistant")]
    reply1 = [*empty_thought, *E("「你又迟到了！」"), en]
    prompt2 = [st, *E("user"), msg, *E("Kyon: sorry"), en, st, *E("assistant")]
    reply2 = [*empty_thought, *E("Whatever."), en]

    ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048, enable_thinking=True)

    assert ids == prompt1 + reply1 + prompt2 + reply2 + [ret]
    assert labels == [X] * len(prompt1) + reply1 + [X] * len(prompt2) + reply2 + [ret]


def test_gpt_oss_default_system(gpt_oss_tok):
    conv = Conversation("", (Message("user", "hi"), Message("assistant", "yo")))
    ids, _ = encode_supervised(gpt_oss_tok, GPT_OSS, conv, cutoff_len=2048)
    assert gpt_oss_tok.decode(ids).startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.<|end|><|start|>user"
    )


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_supervised_tokens_are_exactly_the_replies(family, llama3_tok, gpt_oss_tok):
    """Labelled tokens = each assistant content + its end-of-turn token (+ <|return|> once for gpt_oss)."""
    tok, tpl = (llama3_tok, LLAMA3) if family == "llama3" else (gpt_oss_tok, GPT_OSS)
    end = "<|eot_id|>" if family == "llama3" else "<|end|>"
    _, labels = encode_supervised(tok, tpl, CONV, cutoff_len=2048)
    supervised = tok.decode([t for t in labels if t != X])
    expected = "「你又迟到了！」" + end + "Whatever." + end + ("<|return|>" if family == "gpt_oss" else "")
    assert supervised == expected


def test_llama3_prediction_golden(llama3_tok):
    S, E = pieces(llama3_tok)
    ex = encode_prediction(llama3_tok, LLAMA3, CONV, cutoff_len=2048)
    full, _ = encode_supervised(llama3_tok, LLAMA3, CONV, cutoff_len=2048)
    reply = [*E("Whatever."), S("<|eot_id|>")]
    assert ex.prompt_ids + ex.label_ids == full
    assert ex.label_ids == reply
    assert ex.label == "Whatever." and not ex.truncated


def test_gpt_oss_prediction_golden(gpt_oss_tok):
    """History replies appear without a channel (LLaMA-Factory encode_oneturn); the prompt ends in the final channel."""
    S, E = pieces(gpt_oss_tok)
    st, en, msg, ch, ret = S("<|start|>"), S("<|end|>"), S("<|message|>"), S("<|channel|>"), S("<|return|>")
    ex = encode_prediction(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048)
    assert ex.prompt_ids == [
        st, *E("system"), msg, *E("你是凉宫春日。"), en,
        st, *E("user"), msg, *E("阿虚:「早」"), en, st, *E("assistant"),
        *E("「你又迟到了！」"), en,
        st, *E("user"), msg, *E("Kyon: sorry"), en, st, *E("assistant"),
        ch, *E("analysis"), msg, en, st, *E("assistant"), ch, *E("final"), msg,
    ]
    assert ex.label_ids == [*E("Whatever."), en, ret]


def test_infer_seqlen_branches():
    """Literal cases of LLaMA-Factory's infer_seqlen, one per branch, plus no truncation."""
    assert infer_seqlen(100, 10, 50) == (40, 10)  # short target: source cut
    assert infer_seqlen(10, 100, 50) == (10, 40)  # short source: target cut
    assert infer_seqlen(60, 40, 50) == (30, 20)  # both long: in proportion, int(50 * 40/100) = 20
    assert infer_seqlen(10, 5, 50) == (10, 5)


def _long_conv(n_turns: int, last_reply: str) -> Conversation:
    msgs = []
    for i in range(n_turns - 1):
        msgs += [Message("user", f"第{i}句：你好啊，今天天气不错。"), Message("assistant", f"「第{i}句回答。」")]
    msgs += [Message("user", "最后一句"), Message("assistant", last_reply)]
    return Conversation("你是凉宫春日。", tuple(msgs))


@pytest.mark.parametrize("branch", ["short_target", "short_source", "both_long"])
def test_prediction_truncation_keeps_prompt_head(branch, llama3_tok):
    long_reply = "「" + "长长的回答" * 40 + "」"
    conv = _long_conv(12 if branch != "short_source" else 1, "「好。」" if branch == "short_target" else long_reply)
    full = encode_prediction(llama3_tok, LLAMA3, conv, cutoff_len=100_000)
    s, t = len(full.prompt_ids), len(full.label_ids)
    if branch == "short_target":
        cutoff = s  # t * 2 < cutoff: reply kept whole, prompt cut to cutoff - t
        want_s, want_t = cutoff - t, t
    elif branch == "short_source":
        cutoff = 2 * s + 2  # s * 2 < cutoff <= t * 2: prompt whole, reply cut to cutoff - s
        assert t * 2 >= cutoff
        want_s, want_t = s, cutoff - s
    else:
        cutoff = min(s, t)  # both over half: int(cutoff * t / (s + t)) for the reply
        want_t = int(cutoff * t / (s + t))
        want_s = cutoff - want_t
    ex = encode_prediction(llama3_tok, LLAMA3, conv, cutoff_len=cutoff)
    assert ex.prompt_ids == full.prompt_ids[:want_s]
    assert ex.label_ids == full.label_ids[:want_t]
    assert ex.truncated and len(ex.prompt_ids) + len(ex.label_ids) <= cutoff


def test_supervised_truncation_fits_cutoff_and_keeps_alignment(llama3_tok):
    conv = _long_conv(12, "「好。」")
    full_ids, full_labels = encode_supervised(llama3_tok, LLAMA3, conv, cutoff_len=100_000)
    ids, labels = encode_supervised(llama3_tok, LLAMA3, conv, cutoff_len=120)
    assert len(ids) == len(labels) <= 120
    assert len(full_ids) > 120
    # every kept label is either ignored or equal to its input token
    assert all(lab in (X, tok) for lab, tok in zip(labels, ids))


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_chat_template_matches_prompt_encoding(family, llama3_tok, gpt_oss_tok):
    """The jinja chat template shipped in a tiny model renders the same prompt as our encoder."""
    tok, tpl = (llama3_tok, LLAMA3) if family == "llama3" else (gpt_oss_tok, GPT_OSS)
    msgs = list(CONV.messages[:3])
    ours = chat_prompt_ids(tok, tpl, CONV.system, msgs)
    chat = [{"role": "system", "content": CONV.system}] + [{"role": m.role, "content": m.content} for m in msgs]
    theirs = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ours) == theirs


def test_chat_prompt_needs_user_last(llama3_tok):
    with pytest.raises(ValueError, match="end with a user message"):
        chat_prompt_ids(llama3_tok, LLAMA3, "", list(CONV.messages))


def test_stop_tokens(llama3_tok, gpt_oss_tok):
    assert set(stop_token_ids(llama3_tok, LLAMA3)) == {llama3_tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>")}
    assert set(stop_token_ids(gpt_oss_tok, GPT_OSS)) == {gpt_oss_tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")}
