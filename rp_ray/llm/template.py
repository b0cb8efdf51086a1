"""Chat templates with LLaMA-Factory's exact token layout (``llama3`` and ``gpt_oss``).

Token ids are built the way LLaMA-Factory's ``Template._encode`` builds them: each
slot string (prefix, system, user, assistant) is tokenized on its own with
``add_special_tokens=False`` and the ids are concatenated. So a model fine-tuned
here sees exactly what it would have seen under LLaMA-Factory, and eval numbers
are comparable.

- ``llama3``: ``<bos>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per message; the user slot carries the assistant header, so the generation
  prompt is ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``. No default system.
- ``gpt_oss`` (LLaMA-Factory 0.9.5's ``gpt_oss``, not OpenAI's own harmony rendering):
  system ``<|start|>system<|message|>{content}<|end|>`` (default "You are ChatGPT, ..."),
  user ``<|start|>user<|message|>{content}<|end|><|start|>assistant`` (it opens the reply),
  assistant ``{content}`` alone: a reply has no ``<|end|>``, the next user turn follows it
  directly. The reasoning block is ``<|channel|>analysis<|message|>`` ...
  ``<|end|><|start|>assistant<|channel|>final<|message|>``; an empty one closes each prompt
  with thinking off (our default, unlabelled) or opens each reply with thinking on
  (LLaMA-Factory's default, labelled).
- ``efficient_eos`` (gpt_oss): the eos ``<|return|>`` is appended once, at the end of a
  training example and of a prediction label, and is what ends a reply. Since a reply has
  no end token of its own, LLaMA-Factory teaches "the reply is over" by labelling the first
  token of every later user turn with the eos (``[eos] + [-100] * (len(source) - 1)``);
  we do the same, so the loss matches LLaMA-Factory's token for token.

Prediction prompts follow LLaMA-Factory's ``encode_oneturn`` to the token: only the last
turn gets the empty reasoning block, earlier replies appear bare
(``<|start|>assistant{reply}<|start|>user...``), so scores stay comparable. A LoRA trained
with this layout must be served with it (``chat_prompt_ids`` replays chat history the same
way); the base gpt-oss was trained on OpenAI's rendering, where history replies end in
``<|end|>`` and carry ``<|channel|>final``.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from rp_ray.config import Family
from rp_ray.data.conversation import Conversation, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """Slot strings (``{content}`` is replaced) and the special tokens of one chat family."""

    name: Family
    bos: bool
    system_slot: str
    user_slot: str
    assistant_slot: str
    default_system: str
    thought_words: tuple[str, str] | None
    # LLaMA-Factory's efficient_eos: this token ends the last reply (labelled) and labels the first token of every
    # later user turn; None = each reply carries its own end token in assistant_slot
    efficient_eos: str | None
    stop_words: tuple[str, ...]
    special_tokens: tuple[str, ...]  # the family's special tokens that a tokenizer must know
    # the reply's header, which LLaMA-Factory writes at the end of the user slot
    reply_header: str = ""

    @property
    def empty_thought(self) -> str:
        assert self.thought_words is not None
        return self.thought_words[0] + self.thought_words[1]

    @property
    def user_block(self) -> str:
        """The user slot without the reply's header: a user message that no reply follows."""
        return self.user_slot.removesuffix(self.reply_header)


LLAMA3 = Template(
    name="llama3",
    bos=True,
    system_slot="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user_slot="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_slot="{content}<|eot_id|>",
    default_system="",
    thought_words=None,
    efficient_eos=None,
    stop_words=("<|eot_id|>", "<|eom_id|>"),
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ),
    reply_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
)

GPT_OSS = Template(
    name="gpt_oss",
    bos=False,
    system_slot="<|start|>system<|message|>{content}<|end|>",
    user_slot="<|start|>user<|message|>{content}<|end|><|start|>assistant",
    assistant_slot="{content}",
    default_system="You are ChatGPT, a large language model trained by OpenAI.",
    thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
    efficient_eos="<|return|>",
    stop_words=("<|return|>", "<|call|>"),
    special_tokens=(
        "<|startoftext|>",
        "<|endoftext|>",
        "<|return|>",
        "<|constrain|>",
        "<|channel|>",
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|call|>",
    ),
    reply_header="<|start|>assistant",
)

TEMPLATES: dict[str, Template] = {"llama3": LLAMA3, "gpt_oss": GPT_OSS}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's budget split between prompt (source) and reply (target).

    A short target keeps all of itself (up to cutoff) and the source takes the rest;
    else a short source is kept whole and the target takes the rest; else both are
    cut in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def _ids(tok: PreTrainedTokenizerBase, text: str, literal: bool = False) -> list[int]:
    """``text``'s ids; ``literal``: text that spells a special token (``<|eot_id|>``) stays text, as serving encodes
    what users and cards wrote."""
    if not text:
        return []
    if literal:
        # encode_batch, not encode: it releases the GIL while it runs (encode holds it), so a long prompt tokenized
        # in a serving thread does not stall the replica's event loop (a 1.7M-character text: 1.8 s vs 0.17 s)
        return _literal_tokenizer(tok).encode_batch([text], add_special_tokens=False)[0].ids
    return tok.encode(text, add_special_tokens=False)


_LITERAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _literal_tokenizer(tok: PreTrainedTokenizerBase) -> Tokenizer:
    """A copy of ``tok``'s Rust tokenizer that never matches special tokens in text (``encode_special_tokens``, what
    ``split_special_tokens=True`` sets). A copy, because that call sets the flag on the shared tokenizer for its
    duration: a prompt built in one thread while another encodes could lose it and parse the text's special tokens
    after all."""
    lit = _LITERAL.get(tok)
    if lit is None:
        lit = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        lit.encode_special_tokens = True
        lit.no_truncation()  # what a call on ``tok`` may have left set; ids here are never cut or padded
        lit.no_padding()
        _LITERAL[tok] = lit
    return lit


def text_ids(tok: PreTrainedTokenizerBase, text: str, special_tokens_in_text: bool = True) -> list[int]:
    """Ids of a text inside a message (a lorebook entry, a scene), as ``chat_prompt_ids`` encodes it."""
    return _ids(tok, text, literal=not special_tokens_in_text)


def _slot_ids(tok: PreTrainedTokenizerBase, tpl: Template, slot: str, content: str, literal: bool) -> list[int]:
    """``slot`` with ``{content}`` replaced by ``content``, encoded. ``literal``: the slot's own special tokens stay
    control tokens and everything else is text, so a message or card that spells ``<|start_header_id|>system`` cannot
    open a turn of its own. The slot is cut at its special tokens exactly where the tokenizer cuts a string at its
    added tokens, so text without special-token spellings gets the same ids either way."""
    if not literal:
        return _ids(tok, slot.replace("{content}", content, 1))
    ids: list[int] = []
    for piece in _special_split(tpl).split(slot):
        if piece in tpl.special_tokens:
            ids.append(tok.convert_tokens_to_ids(piece))
        else:
            ids += _ids(tok, piece.replace("{content}", content, 1), literal=True)
    return ids


def _special_split(tpl: Template) -> re.Pattern[str]:
    """Splits a string at the template's special tokens, keeping them (longest first, as a tokenizer matches)."""
    words = sorted(tpl.special_tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(w) for w in words) + ")")


def _remove_thought(tpl: Template, content: str) -> str:
    assert tpl.thought_words is not None
    pattern = re.compile(f"{re.escape(tpl.thought_words[0])}(.*?){re.escape(tpl.thought_words[1])}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def _has_thought(tpl: Template, content: str) -> bool:
    assert tpl.thought_words is not None
    return tpl.thought_words[0].strip() in content or tpl.thought_words[1].strip() in content


def _encode_messages(
    tok: PreTrainedTokenizerBase, tpl: Template, system: str, messages: list[Message]
) -> list[list[int]]:
    """One id list per message: the first carries bos and the system slot (LLaMA-Factory ``_encode``)."""
    system = system or tpl.default_system
    out = []
    for i, m in enumerate(messages):
        ids: list[int] = []
        if i == 0:
            if tpl.bos:
                ids.append(tok.bos_token_id)
            if system:
                ids += _ids(tok, tpl.system_slot.replace("{content}", system, 1))
        slot = tpl.user_slot if m.role == "user" else tpl.assistant_slot
        ids += _ids(tok, slot.replace("{content}", m.content, 1))
        out.append(ids)
    return out


def encode_pairs(
    tok: PreTrainedTokenizerBase, tpl: Template, conv: Conversation, enable_thinking: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per user/assistant pair, as LLaMA-Factory's ``encode_multiturn``."""
    messages = list(conv.messages)
    if tpl.thought_words is not None and not enable_thinking:
        messages = [Message(m.role, _remove_thought(tpl, m.content)) if m.role == "assistant" else m for m in messages]
    enc = _encode_messages(tok, tpl, conv.system, messages)
    if tpl.thought_words is not None:
        thought = _ids(tok, tpl.empty_thought)
        for i in range(0, len(messages), 2):
            if not _has_thought(tpl, messages[i + 1].content):
                if enable_thinking:
                    enc[i + 1] = thought + enc[i + 1]
                else:
                    enc[i] = enc[i] + thought
    return [(enc[i], enc[i + 1]) for i in range(0, len(enc), 2)]


def encode_supervised(
    tok: PreTrainedTokenizerBase, tpl: Template, conv: Conversation, cutoff_len: int, enable_thinking: bool = False
) -> tuple[list[int], list[int]]:
    """Training ids and labels: every assistant reply is labelled, prompts are -100.

    Turns are added in order until ``cutoff_len`` is reached, each cut by ``infer_seqlen``
    against the remaining budget (LLaMA-Factory ``SupervisedDatasetProcessor``). With
    ``efficient_eos`` the budget starts at 1 (the final eos always fits), the eos ends the
    example, labelled, and the first token of every user turn after the first is labelled
    with the eos: there the model learns that the previous reply is over.
    """
    eos = [tok.convert_tokens_to_ids(tpl.efficient_eos)] if tpl.efficient_eos else []
    input_ids: list[int] = []
    labels: list[int] = []
    total = len(eos)
    for turn, (source, target) in enumerate(encode_pairs(tok, tpl, conv, enable_thinking)):
        if total >= cutoff_len:
            break
        s_len, t_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:s_len], target[:t_len]
        total += s_len + t_len
        # LLaMA-Factory writes [eos] + [-100] * (s_len - 1); the slice keeps labels aligned when s_len is 0
        source_labels = (eos if turn > 0 else []) + [IGNORE_INDEX] * s_len
        input_ids += source + target
        labels += source_labels[:s_len] + target
    return input_ids + eos, labels + eos


def encode_oneturn(
    tok: PreTrainedTokenizerBase, tpl: Template, system: str, messages: list[Message], enable_thinking: bool = False
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for messages ending with an assistant turn (LLaMA-Factory ``encode_oneturn``).

    The prompt is every message but the last. For gpt_oss, earlier replies lose any
    reasoning block and the empty block goes to the prompt (thinking off) or the reply.
    """
    messages = list(messages)
    if tpl.thought_words is not None:
        messages = [
            Message(m.role, _remove_thought(tpl, m.content)) if m.role == "assistant" and i < len(messages) - 2 else m
            for i, m in enumerate(messages)
        ]
        if not enable_thinking:
            messages[-1] = Message("assistant", _remove_thought(tpl, messages[-1].content))
    enc = _encode_messages(tok, tpl, system, messages)
    prompt = [i for ids in enc[:-1] for i in ids]
    reply = enc[-1]
    if tpl.thought_words is not None and not _has_thought(tpl, messages[-1].content):
        thought = _ids(tok, tpl.empty_thought)
        if enable_thinking:
            reply = thought + reply
        else:
            prompt = prompt + thought
    return prompt, reply


@dataclass(frozen=True)
class PredictionExample:
    prompt_ids: list[int]
    label_ids: list[int]
    label: str  # the last assistant message, as scored
    truncated: bool


def encode_prediction(
    tok: PreTrainedTokenizerBase, tpl: Template, conv: Conversation, cutoff_len: int, enable_thinking: bool = False
) -> PredictionExample:
    """Prompt = every turn but the last, label = the last assistant turn; both cut by ``infer_seqlen``.

    The head of the prompt is kept (LLaMA-Factory ``UnsupervisedDatasetProcessor``).
    """
    prompt, reply = encode_oneturn(tok, tpl, conv.system, list(conv.messages), enable_thinking)
    if tpl.efficient_eos:
        reply = reply + [tok.convert_tokens_to_ids(tpl.efficient_eos)]
    s_len, t_len = infer_seqlen(len(prompt), len(reply), cutoff_len)
    truncated = s_len < len(prompt) or t_len < len(reply)
    return PredictionExample(prompt[:s_len], reply[:t_len], conv.messages[-1].content, truncated)


def chat_prompt_ids(
    tok: PreTrainedTokenizerBase,
    tpl: Template,
    system: str,
    messages: list[Message],
    enable_thinking: bool = False,
    special_tokens_in_text: bool = True,
) -> list[int]:
    """Generation prompt for a chat (serving and live chat), for messages in any order a chat template accepts.

    Each message is laid out as its slot, in order: the first with the BOS and the system slot (``system``, else
    the template's default), a user message as the user slot up to the reply's header, an assistant message as the
    reply's header and the assistant slot, a system message after the first turn as the system slot, where it
    stands (an empty one is skipped). After a trailing user or system message the reply's header opens the reply;
    a trailing assistant message is continued: its text is the start of the reply, without an end-of-turn token.
    For gpt_oss, earlier replies lose any reasoning block and the empty one goes after the last reply header
    (thinking off). The ids are those of LLaMA-Factory's slots: a chat of user/assistant turns ending with a user
    message gets exactly ``encode_oneturn``'s prediction prompt, the layout a LoRA trained here saw.

    ``special_tokens_in_text`` false (what serving does unless its config allows them): text in ``system`` and the
    messages that spells a special token stays text (see ``_slot_ids``); only the template's own tokens, and the
    reasoning block's words that open a continued gpt_oss reply, are control tokens. True is LLaMA-Factory's
    parsing, which training and evaluation keep.
    """
    literal = not special_tokens_in_text
    ids = [tok.bos_token_id] if tpl.bos else []
    system = system or tpl.default_system
    if system:
        ids += _slot_ids(tok, tpl, tpl.system_slot, system, literal)
    end = len(messages) - 1
    for i, m in enumerate(messages):
        if m.role == "user":
            ids += _slot_ids(tok, tpl, tpl.user_block, m.content, literal)
        elif m.role == "system":
            if m.content:
                ids += _slot_ids(tok, tpl, tpl.system_slot, m.content, literal)
        elif i < end:
            content = _remove_thought(tpl, m.content) if tpl.thought_words is not None else m.content
            ids += _ids(tok, tpl.reply_header) + _slot_ids(tok, tpl, tpl.assistant_slot, content, literal)
    continued = messages[-1].content if messages and messages[-1].role == "assistant" else None
    ids += _ids(tok, tpl.reply_header)
    if tpl.thought_words is not None and not enable_thinking and not _has_thought(tpl, continued or ""):
        ids += _ids(tok, tpl.empty_thought)
    if continued is not None:  # no end-of-turn token: the reply goes on from here
        if literal and tpl.thought_words is not None:
            # a reasoning block the client started is the template's own structure (``_has_thought`` saw it above)
            words = re.compile("(" + "|".join(re.escape(w) for w in tpl.thought_words) + ")")
            for piece in words.split(continued):
                ids += _ids(tok, piece, literal=piece not in tpl.thought_words)
        else:
            ids += _ids(tok, continued, literal)
    return ids


def _emit(slot: str, content: str = "") -> str:
    """A Jinja statement writing ``slot`` with ``{content}`` replaced by the Jinja expression ``content``."""

    def lit(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    head, has_content, tail = slot.partition("{content}")
    parts = [lit(head), *([content] if has_content else []), *([lit(tail)] if tail else [])]
    return "{{ " + " + ".join(parts) + " }}"


def chat_template_jinja(tpl: Template) -> str:
    """A Jinja chat template rendering what ``chat_prompt_ids`` lays out (thinking off): leading system messages
    joined by blank lines into the system slot, every other message in its slot where it stands, and the final
    assistant message of a gpt_oss chat after the empty reasoning block (``continue_final_message`` continues it as
    the served prompt does)."""
    reply = tpl.reply_header + (tpl.empty_thought if tpl.thought_words is not None else "")
    text = "m['content']"
    default = _emit(tpl.default_system)[3:-3]
    return (
        "{% set ns = namespace(lead=0) %}"
        "{% for m in messages %}{% if m['role'] == 'system' and ns.lead == loop.index0 %}{% set ns.lead = loop.index %}"
        "{% endif %}{% endfor %}"
        "{% set system = messages[:ns.lead] | selectattr('content') | map(attribute='content') | join('\\n\\n') %}"
        "{% set system = system or "
        + default
        + " %}"
        + ("{{ bos_token }}" if tpl.bos else "")
        + "{% if system %}"
        + _emit(tpl.system_slot, "system")
        + "{% endif %}"
        "{% for m in messages[ns.lead:] %}"
        "{% if m['role'] == 'user' %}"
        + _emit(tpl.user_block, text)
        + "{% elif m['role'] == 'system' %}{% if m['content'] %}"
        + _emit(tpl.system_slot, text)
        + "{% endif %}"
        "{% elif loop.last %}"
        + _emit(reply + tpl.assistant_slot, text)
        + "{% else %}"
        + _emit(tpl.reply_header + tpl.assistant_slot, text)
        + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + _emit(reply) + "{% endif %}"
    )


def stop_token_ids(tok: PreTrainedTokenizerBase, tpl: Template) -> list[int]:
    """eos plus the template's stop words, as LLaMA-Factory's ``get_stop_token_ids``."""
    ids = {tok.eos_token_id} | {tok.convert_tokens_to_ids(w) for w in tpl.stop_words}
    return sorted(i for i in ids if i is not None)
