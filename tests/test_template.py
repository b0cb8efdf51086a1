"""Golden tests: the llama3 / gpt_oss templates produce LLaMA-Factory's token layout exactly.

Expected sequences are written out piece by piece below: special tokens by name,
plain text segments through the tokenizer (special tokens split the text, so a
segment between two of them tokenizes on its own). Source of the layouts:
LLaMA-Factory 0.9.5's `llama3` and `gpt_oss` templates (template.py) and its supervised /
unsupervised processors. The gpt_oss layout is also checked against LLaMA-Factory 0.9.5's
own encoder output, kept in the shared golden file (skipped when it is absent).
"""

from __future__ import annotations

import json
from itertools import groupby

import pytest
from conftest import REPO

from rp_ray.data import Conversation, Message
from rp_ray.llm.template import (
    GPT_OSS,
    IGNORE_INDEX,
    LLAMA3,
    chat_prompt_ids,
    encode_pairs,
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
    prompt1 = [
        bos,
        sh,
        *E("system"),
        eh,
        *E("\n\n你是凉宫春日。"),
        eot,
        sh,
        *E("user"),
        eh,
        *E("\n\n阿虚:「早」"),
        eot,
        sh,
        *E("assistant"),
        eh,
        *E("\n\n"),
    ]
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
        "<|start_header_id|>user<|end_header_id|>\n\nKyon: sorry<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Whatever.<|eot_id|>"
    )


def test_llama3_has_no_default_system(llama3_tok):
    S, E = pieces(llama3_tok)
    conv = Conversation("", (Message("user", "hi"), Message("assistant", "yo")))
    ids, _ = encode_supervised(llama3_tok, LLAMA3, conv, cutoff_len=2048)
    assert ids[:4] == [S("<|begin_of_text|>"), S("<|start_header_id|>"), *E("user"), S("<|end_header_id|>")][:4]
    assert "system" not in llama3_tok.decode(ids)


def _gpt_oss_pieces(tok):
    S, E = pieces(tok)
    st, en, msg, ch, ret = S("<|start|>"), S("<|end|>"), S("<|message|>"), S("<|channel|>"), S("<|return|>")
    empty_thought = [ch, *E("analysis"), msg, en, st, *E("assistant"), ch, *E("final"), msg]
    return S, E, st, en, msg, ret, empty_thought


def test_gpt_oss_supervised_golden_thinking_off(gpt_oss_tok):
    """Replies carry no <|end|>; the next user turn's first token is labelled with the eos; <|return|> ends it."""
    S, E, st, en, msg, ret, empty_thought = _gpt_oss_pieces(gpt_oss_tok)
    prompt1 = [
        st,
        *E("system"),
        msg,
        *E("你是凉宫春日。"),
        en,
        st,
        *E("user"),
        msg,
        *E("阿虚:「早」"),
        en,
        st,
        *E("assistant"),
        *empty_thought,
    ]
    reply1 = [*E("「你又迟到了！」")]
    prompt2 = [st, *E("user"), msg, *E("Kyon: sorry"), en, st, *E("assistant"), *empty_thought]
    reply2 = [*E("Whatever.")]

    ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048)

    assert ids == prompt1 + reply1 + prompt2 + reply2 + [ret]
    assert labels == [X] * len(prompt1) + reply1 + [ret] + [X] * (len(prompt2) - 1) + reply2 + [ret]


def test_gpt_oss_supervised_golden_thinking_on(gpt_oss_tok):
    """LLaMA-Factory's default: the empty analysis block is part of each labelled reply."""
    S, E, st, en, msg, ret, empty_thought = _gpt_oss_pieces(gpt_oss_tok)
    prompt1 = [
        st,
        *E("system"),
        msg,
        *E("你是凉宫春日。"),
        en,
        st,
        *E("user"),
        msg,
        *E("阿虚:「早」"),
        en,
        st,
        *E("assistant"),
    ]
    reply1 = [*empty_thought, *E("「你又迟到了！」")]
    prompt2 = [st, *E("user"), msg, *E("Kyon: sorry"), en, st, *E("assistant")]
    reply2 = [*empty_thought, *E("Whatever.")]

    ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048, enable_thinking=True)

    assert ids == prompt1 + reply1 + prompt2 + reply2 + [ret]
    assert labels == [X] * len(prompt1) + reply1 + [ret] + [X] * (len(prompt2) - 1) + reply2 + [ret]


def test_gpt_oss_default_system(gpt_oss_tok):
    conv = Conversation("", (Message("user", "hi"), Message("assistant", "yo")))
    ids, _ = encode_supervised(gpt_oss_tok, GPT_OSS, conv, cutoff_len=2048)
    assert gpt_oss_tok.decode(ids).startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.<|end|><|start|>user"
    )


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_supervised_tokens_are_exactly_the_replies(family, llama3_tok, gpt_oss_tok):
    """Labelled tokens = each assistant content + the token that ends it.

    llama3: the reply's own <|eot_id|>. gpt_oss: a reply has no end token, so the eos <|return|>
    is the label of the next user turn's first token and of the appended final eos.
    """
    tok, tpl = (llama3_tok, LLAMA3) if family == "llama3" else (gpt_oss_tok, GPT_OSS)
    end = "<|eot_id|>" if family == "llama3" else "<|return|>"
    _, labels = encode_supervised(tok, tpl, CONV, cutoff_len=2048)
    supervised = tok.decode([t for t in labels if t != X])
    assert supervised == "「你又迟到了！」" + end + "Whatever." + end


def test_llama3_prediction_golden(llama3_tok):
    S, E = pieces(llama3_tok)
    ex = encode_prediction(llama3_tok, LLAMA3, CONV, cutoff_len=2048)
    full, _ = encode_supervised(llama3_tok, LLAMA3, CONV, cutoff_len=2048)
    reply = [*E("Whatever."), S("<|eot_id|>")]
    assert ex.prompt_ids + ex.label_ids == full
    assert ex.label_ids == reply
    assert ex.label == "Whatever." and not ex.truncated


def test_gpt_oss_prediction_golden(gpt_oss_tok):
    """History replies appear bare, without a channel or an end (LLaMA-Factory encode_oneturn);
    only the last turn gets the empty reasoning block, so the prompt ends in the final channel."""
    S, E, st, en, msg, ret, empty_thought = _gpt_oss_pieces(gpt_oss_tok)
    ex = encode_prediction(gpt_oss_tok, GPT_OSS, CONV, cutoff_len=2048)
    assert ex.prompt_ids == [
        st,
        *E("system"),
        msg,
        *E("你是凉宫春日。"),
        en,
        st,
        *E("user"),
        msg,
        *E("阿虚:「早」"),
        en,
        st,
        *E("assistant"),
        *E("「你又迟到了！」"),
        st,
        *E("user"),
        msg,
        *E("Kyon: sorry"),
        en,
        st,
        *E("assistant"),
        *empty_thought,
    ]
    assert ex.label_ids == [*E("Whatever."), ret]
    # serving replays a chat the same way: the prompt for the next reply is the prediction prompt
    assert chat_prompt_ids(gpt_oss_tok, GPT_OSS, CONV.system, list(CONV.messages[:3])) == ex.prompt_ids


GOLDEN = REPO.parent / "shared" / "golden" / "lf095_gpt_oss_golden.json"
# The two conversations LLaMA-Factory encoded for the golden file (their contents are visible in its texts);
# the second has no system message, so the default system prompt is used.
GOLDEN_CONVS = (
    Conversation(
        "你正在扮演凉宫春日。",
        (
            Message("user", "阿虚:「早上好。」"),
            Message("assistant", "「你又迟到了！」"),
            Message("user", "阿虚:「抱歉，路上堵车。」"),
            Message("assistant", "「罚你请客！」"),
        ),
    ),
    Conversation("", (Message("user", "Harry:「Yeah.」"), Message("assistant", "「Well, we need three.」"))),
)


@pytest.fixture(scope="module")
def lf_golden() -> dict:
    if not GOLDEN.is_file():
        pytest.skip(f"{GOLDEN} not found (LLaMA-Factory 0.9.5 golden output lives outside the repo)")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def label_runs(tok, ids: list[int], labels: list[int]) -> list[list[str]]:
    """The golden file's view of one example: runs of "-" (ignored), "L" (labelled with itself) and
    "E" (labelled with the eos instead), each with the text of its input tokens."""
    eos = tok.convert_tokens_to_ids("<|return|>")
    kinds = []
    for i, lab in zip(ids, labels, strict=True):
        assert lab in (X, i, eos), f"label {lab} on input {i} is none of -100, the input, the eos"
        kinds.append("-" if lab == X else "L" if lab == i else "E")
    runs, pos = [], 0
    for kind, group in groupby(kinds):
        n = len(list(group))
        runs.append([kind, _text(tok, ids[pos : pos + n])])
        pos += n
    return runs


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking_off", "thinking_on"])
def test_gpt_oss_prediction_matches_llamafactory(lf_golden, gpt_oss_tok, thinking):
    """Prompt and label strings of LLaMA-Factory 0.9.5's prediction encoding, character for character."""
    cases = lf_golden[f"predict, thinking {'on' if thinking else 'off'}"]
    for conv, want in zip(GOLDEN_CONVS, cases, strict=True):
        ex = encode_prediction(gpt_oss_tok, GPT_OSS, conv, cutoff_len=2048, enable_thinking=thinking)
        assert _text(gpt_oss_tok, ex.prompt_ids) == want["prompt"]
        assert _text(gpt_oss_tok, ex.label_ids) == want["label"]
        assert not ex.truncated


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking_off", "thinking_on"])
def test_gpt_oss_training_matches_llamafactory(lf_golden, gpt_oss_tok, thinking):
    """Training text and label runs (-, L, E) of LLaMA-Factory 0.9.5's supervised encoding."""
    cases = lf_golden[f"train, thinking {'on' if thinking else 'off'}"]
    for conv, want in zip(GOLDEN_CONVS, cases, strict=True):
        ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, conv, cutoff_len=2048, enable_thinking=thinking)
        assert _text(gpt_oss_tok, ids) == want["text"]
        assert label_runs(gpt_oss_tok, ids, labels) == want["label_runs"]


def test_gpt_oss_cutoff_matches_llamafactory_layout(lf_golden, gpt_oss_tok):
    """LLaMA-Factory's cutoff_len=40 case, as a layout rule.

    Rule: 1 token is reserved for the final eos; the first turn's reply is short, so
    infer_seqlen keeps it whole and cuts the prompt from its end to fill the budget exactly;
    nothing of a later turn fits; the eos still ends the example, labelled. LLaMA-Factory's
    40 counts tokens of gpt-oss's real tokenizer, so for our tiny tokenizer the cutoff is chosen
    per conversation to cut the prompt where LLaMA-Factory did: 1 + the reply's tokens + the
    longest head of the prompt whose text is a head of LLaMA-Factory's kept prompt. Where
    LLaMA-Factory cut next to a special token (first conversation, inside the reasoning block)
    the texts match exactly; where it cut inside plain text ("...trained by OpenA") our tokens
    split the text elsewhere, so our kept prompt stops inside the same token of ours.
    """
    key = next(k for k in lf_golden if k.startswith("train, thinking off, cutoff_len 40"))
    for n, (conv, want) in enumerate(zip(GOLDEN_CONVS, lf_golden[key], strict=True)):
        lf_kept = want["label_runs"][0][1]
        (source, target), *_ = encode_pairs(gpt_oss_tok, GPT_OSS, conv)
        k = max(i for i in range(len(source) + 1) if lf_kept.startswith(_text(gpt_oss_tok, source[:i])))
        assert k < len(source), "LLaMA-Factory cut this prompt; ours must be cut too"
        cutoff = 1 + len(target) + k
        assert len(target) * 2 < cutoff - 1, "the short-reply branch of infer_seqlen, as in LLaMA-Factory's case"

        ids, labels = encode_supervised(gpt_oss_tok, GPT_OSS, conv, cutoff_len=cutoff)
        runs = label_runs(gpt_oss_tok, ids, labels)

        assert len(ids) == cutoff  # the budget is filled, as LLaMA-Factory's n_tokens == cutoff_len
        assert [r[0] for r in runs] == [r[0] for r in want["label_runs"]] == ["-", "L"]  # later turns dropped
        assert runs[1] == want["label_runs"][1]  # the whole reply, then the eos
        assert _text(gpt_oss_tok, ids) == runs[0][1] + runs[1][1]
        if n == 0:
            assert runs[0][1] == lf_kept == want["text"].removesuffix(want["label_runs"][1][1])
        else:
            assert lf_kept.startswith(runs[0][1]) and _text(gpt_oss_tok, source[: k + 1]).startswith(lf_kept)


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


# The message shapes SillyTavern sends in Chat Completion mode: a head of system messages and the greeting, then
# post-history instructions, an Author's Note at depth, Impersonate, Continue, a generation right after the greeting
HEAD = [
    ("system", "Write Haruhi's next reply in a fictional chat between Haruhi and User."),
    ("system", "Haruhi Suzumiya, the brigade chief of the SOS Brigade."),
    ("system", ""),
    ("system", "[Start a new Chat]"),
    ("assistant", "「我对普通的人类没有兴趣！」"),
]
SHAPES = {
    "plain": [("system", CONV.system), ("user", "阿虚:「早」"), ("assistant", "「你又迟到了！」"), ("user", "抱歉")],
    "post_history": [*HEAD, ("user", "阿虚:「早」"), ("system", "Stay in character as Haruhi.")],
    "authors_note": [
        *HEAD,
        *[("user", "u0"), ("assistant", "a0"), ("system", "[Author's note: rainy day]"), ("user", "u1")],
        *[("assistant", "a1"), ("system", ""), ("user", "u2"), ("assistant", "a2"), ("user", "u3")],
    ],
    "impersonate": [*HEAD, ("user", "u"), ("assistant", "a"), ("system", "[Write your next reply as User.]")],
    "continue": [*HEAD, ("user", "阿虚:「早」"), ("assistant", "春日:「你来晚了！")],
    "after_greeting": HEAD,
    "only_system": HEAD[:2],
    "no_system": [("user", "hi"), ("assistant", "yo"), ("user", "again")],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_every_message_shape_renders_as_the_chat_template(family, shape, llama3_tok, gpt_oss_tok):
    """Any message order: the prompt ids are the model's own chat template's (``apply_chat_template`` with the
    tiny model's chat_template.jinja), a trailing assistant message continued (``continue_final_message``)."""
    tok, tpl = (llama3_tok, LLAMA3) if family == "llama3" else (gpt_oss_tok, GPT_OSS)
    chat = [{"role": r, "content": c} for r, c in SHAPES[shape]]
    lead = next((i for i, m in enumerate(chat) if m["role"] != "system"), len(chat))
    system = "\n\n".join(m["content"] for m in chat[:lead] if m["content"])
    ours = chat_prompt_ids(tok, tpl, system, [Message(m["role"], m["content"]) for m in chat[lead:]])
    cont = len(chat) > lead and chat[-1]["role"] == "assistant"
    text = tok.apply_chat_template(chat, add_generation_prompt=not cont, continue_final_message=cont, tokenize=False)
    assert tok.decode(ours) == text
    assert ours == tok(text, add_special_tokens=False)["input_ids"]


def test_continued_reply_is_open_and_mid_chat_system_has_its_block(llama3_tok):
    ids = chat_prompt_ids(llama3_tok, LLAMA3, "", [Message("user", "u"), Message("assistant", "春日:「你")])
    assert llama3_tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n春日:「你")
    ids = chat_prompt_ids(llama3_tok, LLAMA3, "S", [Message("user", "u"), Message("system", "note")])
    assert llama3_tok.decode(ids).endswith(
        "u<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nnote<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    only_system = llama3_tok.decode(chat_prompt_ids(llama3_tok, LLAMA3, "S", []))
    assert only_system.endswith("S<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_stop_tokens(llama3_tok, gpt_oss_tok):
    assert set(stop_token_ids(llama3_tok, LLAMA3)) == {
        llama3_tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>")
    }
    assert set(stop_token_ids(gpt_oss_tok, GPT_OSS)) == {
        gpt_oss_tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")
    }
