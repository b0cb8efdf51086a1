"""Chat templates with LLaMA-Factory's exact token layout (``llama3`` and ``gpt_oss``).

Token ids are built the way LLaMA-Factory's ``Template._encode`` builds them: each
slot string (prefix, system, user, assistant) is tokenized on its own with
``add_special_tokens=False`` and the ids are concatenated. So a model fine-tuned
here sees exactly what it would have seen under LLaMA-Factory, and eval numbers
are comparable.

- ``llama3``: ``<bos>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per message; the user slot carries the assistant header, so the generation
  prompt is ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``. No default system.
- ``gpt_oss`` (harmony, LLaMA-Factory's ``gpt`` template): ``<|start|>{role}<|message|>{content}<|end|>``,
  user slot ends with ``<|start|>assistant``, default system "You are ChatGPT, ...",
  and an empty reasoning block ``<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>``:
  with thinking off (our default) it closes the prompt; with thinking on
  (LLaMA-Factory's default) it opens the reply. ``<|return|>`` ends each
  supervised sequence (LLaMA-Factory's ``efficient_eos``).

Prediction prompts follow LLaMA-Factory's ``encode_oneturn`` to the token, including
its gpt_oss history layout (earlier replies appear as ``<|start|>assistant{reply}<|end|>``
without a channel), so scores stay comparable.

One deliberate difference from LLaMA-Factory: for ``efficient_eos`` templates it
also puts an eos label on the first prompt token of every later turn; here
labels sit only on assistant tokens (DESIGN.md §4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    end_of_sequence: str | None  # appended, labelled, after the last assistant turn
    stop_words: tuple[str, ...]
    special_tokens: tuple[str, ...]  # the family's special tokens that a tokenizer must know

    @property
    def empty_thought(self) -> str:
        assert self.thought_words is not None
        return self.thought_words[0] + self.thought_words[1]


LLAMA3 = Template(
    name="llama3",
    bos=True,
    system_slot="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user_slot="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_slot="{content}<|eot_id|>",
    default_system="",
    thought_words=None,
    end_of_sequence=None,
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
)

GPT_OSS = Template(
    name="gpt_oss",
    bos=False,
    system_slot="<|start|>system<|message|>{content}<|end|>",
    user_slot="<|start|>user<|message|>{content}<|end|><|start|>assistant",
    assistant_slot="{content}<|end|>",
    default_system="You are ChatGPT, a large language model trained by OpenAI.",
    thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
    end_of_sequence="<|return|>",
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


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) if text else []


def _remove_thought(tpl: Template, content: str) -> str:
    assert tpl.thought_words is not None
    pattern = re.compile(f"{re.escape(tpl.thought_words[0])}(.*?){re.escape(tpl.thought_words[1])}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def _has_thought(tpl: Template, content: str) -> bool:
    assert tpl.thought_words is not None
    return tpl.thought_words[0].strip() in content or tpl.thought_words[1].strip() in content


def _encode_messages(tok: PreTrainedTokenizerBase, tpl: Template, system: str, messages: list[Message]) -> list[list[int]]:
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
    """Training ids and labels: every assistant reply (and its end token) is labelled, the rest is -100.

    Turns are added in order until ``cutoff_len`` is reached, each cut by ``infer_seqlen``
    against the remaining budget (LLaMA-Factory ``SupervisedDatasetProcessor``).
    """
    eos = [tok.convert_tokens_to_ids(tpl.end_of_sequence)] if tpl.end_of_sequence else []
    input_ids: list[int] = []
    labels: list[int] = []
    total = len(eos)
    for source, target in encode_pairs(tok, tpl, conv, enable_thinking):
        if total >= cutoff_len:
            break
        s_len, t_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:s_len], target[:t_len]
        total += s_len + t_len
        input_ids += source + target
        labels += [IGNORE_INDEX] * s_len + target
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
    if tpl.end_of_sequence:
        reply = reply + [tok.convert_tokens_to_ids(tpl.end_of_sequence)]
    s_len, t_len = infer_seqlen(len(prompt), len(reply), cutoff_len)
    truncated = s_len < len(prompt) or t_len < len(reply)
    return PredictionExample(prompt[:s_len], reply[:t_len], conv.messages[-1].content, truncated)


def chat_prompt_ids(
    tok: PreTrainedTokenizerBase, tpl: Template, system: str, messages: list[Message], enable_thinking: bool = False
) -> list[int]:
    """Generation prompt for a chat that ends with a user message (serving and live chat)."""
    if not messages or messages[-1].role != "user":
        raise ValueError("a chat prompt needs messages that end with a user message")
    prompt, _ = encode_oneturn(tok, tpl, system, [*messages, Message("assistant", "")], enable_thinking)
    return prompt


def stop_token_ids(tok: PreTrainedTokenizerBase, tpl: Template) -> list[int]:
    """eos plus the template's stop words, as LLaMA-Factory's ``get_stop_token_ids``."""
    ids = {tok.eos_token_id} | {tok.convert_tokens_to_ids(w) for w in tpl.stop_words}
    return sorted(i for i in ids if i is not None)


_END_MARKERS = ("<|end|>", "<|return|>", "<|call|>")
_FINAL = "<|channel|>final<|message|>"
# what harmony text looks like once its special tokens were stripped by a decoder
_STRIPPED_REASONING = re.compile(r"^\s*analysis.*?assistantfinal", re.DOTALL)


def parse_harmony(text: str) -> str:
    """The clean final-channel reply of gpt-oss output.

    Accepts text decoded with special tokens kept (preferred): the reply is what
    follows the last ``<|channel|>final<|message|>`` (or the whole text when the
    prompt already opened the final channel), cut at ``<|end|>``/``<|return|>``/``<|call|>``.
    Reasoning that never reached a final channel yields "". Text whose special
    tokens were stripped (``analysis...assistantfinal...``) is cleaned too, so such
    literal text never reaches a score or a chat reply.
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


@dataclass
class EncodeStats:
    """What supervised encoding of a split produced."""

    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    max_len: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mean = self.tokens / self.examples if self.examples else 0
        return (
            f"{self.examples} examples, {self.tokens} tokens (mean {mean:.0f}, max {self.max_len}), "
            f"{self.label_tokens} supervised, {self.truncated} truncated at cutoff, {self.seconds:.1f}s"
        )


def encode_supervised_dataset(
    tok: PreTrainedTokenizerBase,
    tpl: Template,
    convs: list[Conversation],
    cutoff_len: int,
    enable_thinking: bool = False,
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode a split for training; rows are ``{"input_ids", "labels"}``."""
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    stats = EncodeStats()
    rows = []
    for conv in tqdm(convs, desc="encode", unit="conv", mininterval=2.0, disable=len(convs) < 2000):
        ids, labels = encode_supervised(tok, tpl, conv, cutoff_len, enable_thinking)
        rows.append({"input_ids": ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.label_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
        stats.max_len = max(stats.max_len, len(ids))
        stats.truncated += len(ids) >= cutoff_len
    stats.seconds = time.perf_counter() - t0
    return rows, stats
