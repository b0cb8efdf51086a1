"""Typed messages of the chat API: the OpenAI wire types, the request limits, OpenAI-style errors, and what
crosses the Ray handle between the ingress and the engine (``ChatSampling`` in, ``Delta`` out).

Unknown request fields are ignored (official clients send optional extras), but every known field is typed and
range-checked, and the serving limits (messages, max_tokens, n, body size) are checked before a request reaches an
engine. Responses and stream chunks are pydantic models whose JSON is exactly OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rp_ray.config import ServeConfig

if TYPE_CHECKING:  # for annotations only: rp_ray.serve.characters imports this module
    from rp_ray.serve.characters import CardSampling

# OpenAI's defaults, used when neither the request nor its character card sets a value
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatSampling(BaseModel):
    """How one request samples: resolved by the ingress, sent to the engine deployment through the Ray handle."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n: int = Field(1, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)
    top_k: int = Field(DEFAULT_TOP_K, ge=-1)
    max_tokens: int = Field(ge=1)
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = Field(default_factory=list)
    stream: bool = False

    def to_sampling_params(self):
        """vLLM ``SamplingParams``: deltas when streaming, else the end only; special tokens kept (gpt-oss channels
        are parsed by the ingress, never shown)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seed=self.seed,
            stop=self.stop or None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling(self, card: CardSampling | None, max_tokens: int, stop_token_ids: list[int]) -> ChatSampling:
        """The request's sampling: each setting from the request, else the character card, else OpenAI's default.

        ``max_tokens`` is what the limits allow (see :func:`check_limits`); a card's ``max_tokens`` lowers it when
        the request names none.
        """

        def pick(name: str, default):
            v = getattr(self, name)
            if v is None and card is not None:
                v = getattr(card, name)
            return default if v is None else v

        if self.requested_max_tokens is None and card is not None and card.max_tokens:
            max_tokens = min(max_tokens, card.max_tokens)
        return ChatSampling(
            n=self.n,
            temperature=pick("temperature", DEFAULT_TEMPERATURE),
            top_p=pick("top_p", DEFAULT_TOP_P),
            top_k=pick("top_k", DEFAULT_TOP_K),
            max_tokens=max_tokens,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or None),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop_token_ids=list(stop_token_ids),
            stream=self.stream,
        )


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


# -- limits ----------------------------------------------------------------------------------------------------


class Limits(BaseModel):
    """Per-request caps: the serve config's fields of the same names (``Limits.from_config``)."""

    model_config = ConfigDict(frozen=True)
    max_messages: int
    max_tokens_cap: int
    max_n: int
    max_body_bytes: int

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Limits:
        return cls(**{name: getattr(cfg, name) for name in cls.model_fields})


def check_limits(req: ChatCompletionRequest, limits: Limits, context_len: int, prompt_tokens: int) -> int:
    """Raise a 400 for a request over the caps; return the max_tokens to generate."""
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; at most {limits.max_messages}", param="messages")
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n}; at most {limits.max_n}", param="n")
    asked = req.requested_max_tokens
    if asked is not None and asked > limits.max_tokens_cap:
        raise APIError(400, f"max_tokens={asked}; at most {limits.max_tokens_cap}", param="max_tokens")
    room = context_len - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens; the context holds {context_len}",
            param="messages",
            code="context_length_exceeded",
        )
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"max_tokens={asked} does not fit: {prompt_tokens} prompt tokens + max_tokens > context {context_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return min(asked or limits.max_tokens_cap, room)


# -- engine outputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    """New raw text of one choice since the engine's last message (special tokens kept), sent back to the ingress."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None


# vLLM's finish reasons to OpenAI's: a request aborted by vLLM ends as a plain stop
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop", None: None}


def finish_reason(engine_reason: str | None) -> str | None:
    return FINISH_REASONS.get(engine_reason, engine_reason)


# -- responses -------------------------------------------------------------------------------------------------


def _none(v: Any) -> bool:
    return v is None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """A non-streamed reply."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """What a stream chunk adds to one choice; unset fields are left out (``{}`` on the closing chunk)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_none)
    content: str | None = Field(None, exclude_if=_none)


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None  # sent as null until the choice ends, as OpenAI does


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed reply; the last one (``stream_options.include_usage``) has no choices
    and the usage; the others have no ``usage`` key."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_none)

    @classmethod
    def of(
        cls, cid: str, model: str, index: int, delta: DeltaMessage, finish_reason: str | None = None
    ) -> ChatCompletionChunk:
        return cls(
            id=cid,
            model=model,
            choices=[ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
        )

    def sse(self) -> str:
        return f"data: {self.model_dump_json()}\n\n"
