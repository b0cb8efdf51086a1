"""OpenAI chat-completions wire types, request limits, and OpenAI-style errors.

Unknown request fields are ignored (official clients send optional extras), but
every known field is typed and range-checked, and the serving limits (messages,
max_tokens, n, body size) are checked before a request reaches an engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(payload: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}", param=param) from None


class Limits(BaseModel):
    """Per-request caps from the serve config."""

    max_messages: int = 64
    max_tokens: int = 2048
    max_n: int = 4
    max_body_bytes: int = 1_048_576


def check_limits(req: ChatCompletionRequest, limits: Limits, context_len: int, prompt_tokens: int) -> int:
    """Raise a 400 for a request over the caps; return the max_tokens to generate."""
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; at most {limits.max_messages}", param="messages")
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n}; at most {limits.max_n}", param="n")
    asked = req.requested_max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens={asked}; at most {limits.max_tokens}", param="max_tokens")
    room = context_len - prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens; the context holds {context_len}", param="messages",
                       code="context_length_exceeded")
    if asked is not None and asked > room:
        raise APIError(400, f"max_tokens={asked} does not fit: {prompt_tokens} prompt tokens + max_tokens > context {context_len}",
                       param="max_tokens", code="context_length_exceeded")
    return min(asked or limits.max_tokens, room)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(cid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    """A non-streaming response; ``texts`` is (content, finish_reason) per choice."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f} for i, (t, f) in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_body(cid: str, model: str, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    """One server-sent event of a streamed response."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
