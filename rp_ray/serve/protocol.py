"""Typed messages of the API: the OpenAI wire types (chat and text completions, vLLM's tokenize/detokenize), the
request limits, OpenAI-style errors, and what passes between the routes and the engine they call in-process
(``ChatSampling`` in, ``Delta`` out).

Unknown request fields are ignored (official clients and SillyTavern send optional extras), but every known field is
typed and range-checked, and the serving limits (messages, max_tokens, n, body size) are checked before a request
reaches an engine. Responses and stream chunks are pydantic models whose JSON is exactly OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from rp_ray.config import ServeConfig

if TYPE_CHECKING:  # for annotations only: rp_ray.serve.characters imports this module
    from rp_ray.serve.characters import CardSampling

# OpenAI's defaults, used when neither the request nor its character card sets a value
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for text completions that name no max_tokens

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300  # entries of one logit_bias map
MAX_STOP_CHARS = 256  # characters of one stop string
CHAT_MAX_STOP = 4  # OpenAI's cap on stop strings
# SillyTavern's text-completion mode sends the names and instruct sequences as stop strings besides the user's own
COMPLETION_MAX_STOP = 16
INT64 = 1 << 63
LOGPROB_FLOOR = -9999.0  # -inf is not JSON: vLLM's server and OpenAI floor logprobs here


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


def _one_or_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def stop_type(max_items: int) -> Any:
    """``stop``: one string or a list of at most ``max_items`` (each at most ``MAX_STOP_CHARS``), validated as a
    list so an error names the string at fault."""
    item = {"type": "string", "maxLength": MAX_STOP_CHARS}
    return Annotated[
        Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=max_items)] | None,
        BeforeValidator(_one_or_list),
        WithJsonSchema({"anyOf": [item, {"type": "array", "items": item, "maxItems": max_items}, {"type": "null"}]}),
    ]


ChatStop = stop_type(CHAT_MAX_STOP)
CompletionStop = stop_type(COMPLETION_MAX_STOP)
# token id (a string key, as JSON objects have) -> bias added to its logit
LogitBias = (
    Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
        Field(max_length=MAX_LOGIT_BIAS),
    ]
    | None
)


def _prompt(v: Any) -> Any:
    """A text completion's prompt: a string, a list of one string, or a non-empty list of token ids."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return v
    raise ValueError("the prompt must be a string, a list of one string, or a non-empty list of token ids (>= 0)")


Prompt = Annotated[
    str | list[int],
    BeforeValidator(_prompt),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        }
    ),
]


class ChatSampling(BaseModel):
    """How one request samples: resolved by the routes from the request, handed to the engine with the prompt."""

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
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # None: no logprobs; k: each token's and top k
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = False
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def to_sampling_params(self):
        """vLLM ``SamplingParams``: deltas when streaming, else the end only. Chat keeps special tokens (gpt-oss
        channels are parsed by the routes, never shown); text completions skip them unless asked."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=self.stop or None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias or None,
            logprobs=self.logprobs,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class SamplingRequest(BaseModel):
    """What chat and text completion requests share: the model, how to sample, how to answer."""

    model_config = ConfigDict(extra="ignore")
    PROMPT_PARAM: ClassVar[str] = "messages"  # the parameter a context overflow is blamed on
    model: str = Field(min_length=1, max_length=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    user: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    @property
    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token to report; None: no logprobs."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Raise a 400 for fields that do not go together or are not supported."""

    def route_sampling(self) -> dict[str, Any]:
        """The ``ChatSampling`` fields only this kind of request sets."""
        return {}

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
        stop = [s for s in self.stop or [] if s]  # an empty stop string would match everywhere: dropped
        return ChatSampling(
            n=self.n,
            temperature=pick("temperature", DEFAULT_TEMPERATURE),
            top_p=pick("top_p", DEFAULT_TOP_P),
            top_k=pick("top_k", DEFAULT_TOP_K),
            max_tokens=max_tokens,
            seed=self.seed,
            stop=stop or None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop_token_ids=list(stop_token_ids),
            stream=self.stream,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=self.top_logprobs_asked,
            **self.route_sampling(),
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: ChatStop = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    rp_debug: bool = Field(
        False,
        description="rp_ray's own: the response (or the stream's first chunk) carries `rp_ray`: the lorebook "
        "entries, scenes and system prompt the prompt was built with.",
    )

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
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


class CompletionRequest(SamplingRequest):
    """A text completion (``POST /v1/completions``) on the raw prompt, as OpenAI's and vLLM's; the vLLM extras
    SillyTavern sends are typed too (those without an effect here are ignored)."""

    PROMPT_PARAM: ClassVar[str] = "prompt"
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1)
    stop: CompletionStop = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def check(self) -> None:
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of={self.best_of} is not supported (only best_of = n)", param="best_of")

    def route_sampling(self) -> dict[str, Any]:
        return dict(
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt (``add_special_tokens``: the BOS, as a text completion adds it) or chat
    messages (the prompt a chat completion builds, the card applied)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    tokens: list[Annotated[int, Field(ge=0)]]


def _param(loc: tuple) -> str | None:
    """The parameter an error is about: its location, cut before a dict key (``logit_bias.<id>.[key]``)."""
    if "[key]" in loc:
        loc = loc[: loc.index("[key]") - 1]
    return ".".join(str(p) for p in loc) or None


def parse_body(payload: Any, model: type[BaseModel]) -> Any:
    """Validate a decoded JSON body as ``model``; the first problem becomes a 400 naming the parameter."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param) from None


def parse_request(payload: Any) -> ChatCompletionRequest:
    """A chat completion request (see :func:`parse_body`)."""
    return parse_body(payload, ChatCompletionRequest)


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


def check_limits(
    req: SamplingRequest, limits: Limits, context_len: int, prompt_tokens: int, default_max_tokens: int | None = None
) -> int:
    """Raise a 400 for a request over the caps or with fields that do not go together; return the max_tokens to
    generate: the request's, else ``default_max_tokens``, else as many as the cap and the context allow."""
    req.check()
    messages = getattr(req, "messages", None)
    if messages is not None and len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages; at most {limits.max_messages}", param="messages")
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
            param=req.PROMPT_PARAM,
            code="context_length_exceeded",
        )
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"max_tokens={asked} does not fit: {prompt_tokens} prompt tokens + max_tokens > context {context_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_tokens = min(asked or default_max_tokens or limits.max_tokens_cap, limits.max_tokens_cap, room)
    min_tokens = getattr(req, "min_tokens", 0)
    if min_tokens > max_tokens:
        raise APIError(400, f"min_tokens={min_tokens} is more than max_tokens={max_tokens}", param="min_tokens")
    return max_tokens


# -- engine outputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its id, text and logprob, and the most likely tokens at its place (id, text, logprob),
    best first."""

    id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """New raw text of one choice since the engine's last message (special tokens kept for chat), sent back to the
    ingress; with the logprobs of its tokens when the request asked for them."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


def _floor(lp: float) -> float:
    return max(lp, LOGPROB_FLOOR)


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Any] | None], top: int
) -> tuple[TokenLogprob, ...]:
    """The compact logprobs of generated tokens from vLLM's (per token: {token id: ``Logprob``} holding the sampled
    token and the top ones, each with its rank and decoded text), keeping the ``top`` best alternatives."""
    out = []
    for tid, pos in zip(token_ids, positions):
        pos = pos or {}
        chosen = pos.get(tid)
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else INT64)[:top]
        out.append(
            TokenLogprob(
                tid,
                (chosen.decoded_token or "") if chosen is not None else "",
                _floor(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
                tuple((t, lp.decoded_token or "", _floor(lp.logprob)) for t, lp in ranked),
            )
        )
    return tuple(out)


# vLLM's finish reasons to OpenAI's: a request aborted by vLLM ends as a plain stop
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop", None: None}


def finish_reason(engine_reason: str | None) -> str | None:
    return FINISH_REASONS.get(engine_reason, engine_reason)


# -- responses -------------------------------------------------------------------------------------------------


def _none(v: Any) -> bool:
    return v is None


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token."""

    content: list[ChatTokenLogprob] | None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = Field(None, exclude_if=_none)  # only when asked
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """A non-streamed reply."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    rp_ray: dict[str, Any] | None = Field(None, exclude_if=_none)  # only with the request's rp_debug


class DeltaMessage(BaseModel):
    """What a stream chunk adds to one choice; unset fields are left out (``{}`` on the closing chunk)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_none)
    content: str | None = Field(None, exclude_if=_none)


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = Field(None, exclude_if=_none)  # only when asked
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
    rp_ray: dict[str, Any] | None = Field(None, exclude_if=_none)  # the first chunk, with the request's rp_debug

    @classmethod
    def of(
        cls,
        cid: str,
        model: str,
        index: int,
        delta: DeltaMessage,
        finish_reason: str | None = None,
        logprobs: ChatLogprobs | None = None,
    ) -> ChatCompletionChunk:
        return cls(
            id=cid,
            model=model,
            choices=[
                ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
            ],
        )

    def sse(self) -> str:
        return f"data: {self.model_dump_json()}\n\n"


class CompletionLogprobs(BaseModel):
    """A text completion choice's ``logprobs`` (OpenAI's legacy shape): per generated token its text, logprob, the
    top alternatives as {token: logprob}, and where it starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A text completion, or one server-sent event of a streamed one (same object; the last event of a stream with
    ``stream_options.include_usage`` has no choices and the usage; the other events have no ``usage`` key)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_none)

    def sse(self) -> str:
        return f"data: {self.model_dump_json()}\n\n"


class TokenizeResponse(BaseModel):
    """vLLM's ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_none)


class DetokenizeResponse(BaseModel):
    prompt: str
