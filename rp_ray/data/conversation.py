"""The validated conversation and the sharegpt rules that produce it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from rp_ray.data.registry import DatasetAttr

Role = Literal["user", "assistant"]

# json.loads accepts an unpaired "\ud800" escape and returns text that no tokenizer or UTF-8 writer can encode
_SURROGATE = re.compile("[\ud800-\udfff]")

# Why a row was dropped, in the order the data report lists them.
DROP_REASONS: dict[str, str] = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not valid JSON",
    "unparsable_json": "valid JSON that Python's parser cannot hold (nested too deeply, an integer of 4300+ digits)",
    "too_long": "the row is larger than data.max_row_bytes",
    "not_object": "the row is not a JSON object",
    "missing_messages": "the messages column is missing or not a list",
    "bad_message": "a message is not an object with string role and content",
    "invalid_unicode": "a text holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not valid Unicode",
    "unknown_role": "a message has a role that is none of the registered tags",
    "tool_turn": "a tool call / observation turn (role-play templates have no tool layout)",
    "role_order": "turns do not alternate user, assistant (after an optional leading system)",
    "no_turns": "no user/assistant turns",
    "odd_turn_count": "the conversation does not end with an assistant turn",
    "empty_content": "a user or assistant message is empty or only whitespace",
    "duplicate": "the same conversation appears earlier in the split",
    "train_val_overlap": "a train conversation that is also in the val split",
}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """A system prompt and alternating user/assistant messages, ending with the assistant."""

    system: str
    messages: tuple[Message, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    def key(self) -> str:
        """Content hash used to find duplicates and train/val overlap."""
        blob = json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()


class Dropped(ValueError):
    """A row that breaks a rule; ``reason`` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def to_conversation(row: Any, attr: DatasetAttr) -> Conversation:
    """Apply LLaMA-Factory's sharegpt rules (plus non-empty content) to one row; raise Dropped if it breaks one."""
    if not isinstance(row, dict):
        raise Dropped("not_object", f"got {type(row).__name__}")
    col = attr.columns.messages
    messages = row.get(col)
    if not isinstance(messages, list):
        what = "missing" if col not in row else type(messages).__name__
        raise Dropped("missing_messages", f"column {col!r} is {what}")
    t = attr.tags
    pairs: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get(t.role_tag), str) and isinstance(m.get(t.content_tag), str)):
            raise Dropped("bad_message", f"message {i} needs string {t.role_tag!r} and {t.content_tag!r}")
        pairs.append((m[t.role_tag], m[t.content_tag]))

    system = ""
    if t.system_tag and pairs and pairs[0][0] == t.system_tag:
        system, pairs = pairs[0][1], pairs[1:]
    elif system_col := attr.columns.system:
        value = row.get(system_col)
        if value is not None and not isinstance(value, str):
            raise Dropped("bad_message", f"system column {system_col!r} is {type(value).__name__}, not a string")
        system = value or ""

    for what, text in [("system prompt", system), *((f"turn {i}", c) for i, (_, c) in enumerate(pairs))]:
        if m := _SURROGATE.search(text):
            raise Dropped(
                "invalid_unicode",
                f"{what}: text is not valid Unicode (a lone surrogate \\u{ord(m.group()):04x} at character "
                f"{m.start()}); the JSON escapes half of a UTF-16 pair: fix or drop that text",
            )

    known = {t.user_tag, t.assistant_tag, t.observation_tag, t.function_tag, t.system_tag} - {None}
    for role, _ in pairs:
        if role not in known:
            raise Dropped("unknown_role", f"message role {role!r}; registered tags: {sorted(known)}")
    for role, _ in pairs:
        if role in (t.observation_tag, t.function_tag):
            raise Dropped("tool_turn", f"role {role!r}")
    expected = (t.user_tag, t.assistant_tag)
    for i, (role, _) in enumerate(pairs):
        if role != expected[i % 2]:
            raise Dropped("role_order", f"turn {i} is {role!r}, expected {expected[i % 2]!r}")
    if not pairs:
        raise Dropped("no_turns")
    if len(pairs) % 2:
        raise Dropped("odd_turn_count", f"{len(pairs)} turns")
    for i, (_, content) in enumerate(pairs):
        if not content.strip():
            raise Dropped("empty_content", f"turn {i}")
    roles: tuple[Role, Role] = ("user", "assistant")
    return Conversation(system, tuple(Message(roles[i % 2], c) for i, (_, c) in enumerate(pairs)))
