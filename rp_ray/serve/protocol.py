"""What the endpoints share on the wire: OpenAI-style errors, chat messages, the sampling fields of chat and text
completion requests and how they become vLLM ``SamplingParams`` (in one step, with the character's sampling, the
max_tokens the limits allow and the stop token ids as defaults), the request limits, usage, and the deltas the
in-process engine yields, and vLLM's ``/tokenize`` and ``/detokenize`` types. The chat and text completion types
are in ``chat`` and ``completion``.

Unknown request fields are ignored (official clients and SillyTavern send optional extras), but every known field is
typed and range-checked, and the serving limits (messages, max_tokens, n, body size) are checked before a request
reaches the engine. Responses and stream chunks are pydantic models whose JSON is exactly OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from rp_ray.character.card import Sampling
from rp_ray.config import ServeConfig

if TYPE_CHECKING:
    from vllm import SamplingParams

# OpenAI's defaults, used when neither the request nor its character card sets a value
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for text completions that name no max_tokens

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300  # entries of one logit_bias map
MAX_STOP_CHARS = 256  # characters of one stop string
# stop strings of one request: vLLM sets no cap; SillyTavern's text-completion mode sends every group member's name
# and the instruct sequences besides the user's own (18 for a group of 14)
MAX_STOP = 256
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


def _text_of(content: Any) -> Any:
    """A message's content: a string, or a list of text parts (``{"type": "text", "text": ...}``) joined by newlines
    as vLLM joins them; any other part is refused (the served models read text only)."""
    if not isinstance(content, list):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if isinstance(kind, str) else "not a text part"
            raise ValueError(f"part {i} is {what}; the served models read text only: send text parts or a string")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    """A chat message: ``developer`` (OpenAI's newer name for system instructions) is a system message; ``name`` is
    accepted and, as the served chat templates do, not rendered."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, BeforeValidator(_text_of)]
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, v: str) -> str:
        return "system" if v == "developer" else v


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


Stop = stop_type(MAX_STOP)
# token id (a string key, as JSON objects have) -> bias added to its logit
LogitBias = (
    Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
        Field(max_length=MAX_LOGIT_BIAS),
    ]
    | None
)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request's sampling falls back on: the character's sampling, the max_tokens the limits allow (a
    character's ``max_tokens`` lowers it when the request names none), and the stop token ids of the template."""

    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    character: Sampling | None = None


class SamplingRequest(BaseModel):
    """What chat and text completion requests share: the model, how to sample, how to answer. Each kind adds
    ``requested_max_tokens``, ``top_logprobs_asked`` (None: no logprobs) and ``endpoint_params`` (the
    ``SamplingParams`` fields it sets its own way)."""

    model_config = ConfigDict(extra="ignore")
    PROMPT_PARAM: ClassVar[str] = "messages"  # the parameter a context overflow is blamed on
    model: str = Field(min_length=1, max_length=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)  # vLLM's range
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Raise a 400 for fields that do not go together or are not supported."""

    def to_sampling_params(self, defaults: SamplingDefaults) -> SamplingParams:
        """vLLM ``SamplingParams``: each setting from the request, else the character's, else OpenAI's default;
        deltas when streaming, else the end only."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        card = defaults.character

        def pick(name: str, default):
            v = getattr(self, name)
            if v is None and card is not None:
                v = getattr(card, name)
            return default if v is None else v

        max_tokens = defaults.max_tokens
        if self.requested_max_tokens is None and card is not None and card.max_tokens:
            max_tokens = min(max_tokens, card.max_tokens)
        stop = [s for s in self.stop or [] if s]  # an empty stop string would match everywhere: dropped
        return SamplingParams(
            n=self.n,
            temperature=pick("temperature", DEFAULT_TEMPERATURE),
            top_p=pick("top_p", DEFAULT_TOP_P),
            top_k=pick("top_k", DEFAULT_TOP_K),
            min_p=0.0 if self.min_p is None else self.min_p,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=stop or None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=self.top_logprobs_asked,
            stop_token_ids=list(defaults.stop_token_ids),
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            **self.endpoint_params(),
        )


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


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt (``add_special_tokens``: the BOS, as a text completion adds it) or chat
    messages (the prompt a chat completion builds, the card applied)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter``: serve the peft folder ``lora_path`` (under ``adapter_root``) as
    ``lora_name``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    tokens: list[Annotated[int, Field(ge=0)]]


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

    def check_messages(self, messages: Sequence[Any] | None) -> None:
        if messages is not None and len(messages) > self.max_messages:
            raise APIError(400, f"{len(messages)} messages; at most {self.max_messages}", param="messages")


def check_limits(
    req: SamplingRequest, limits: Limits, context_len: int, prompt_tokens: int, default_max_tokens: int | None = None
) -> int:
    """Raise a 400 for a request over the caps or with fields that do not go together; return the max_tokens to
    generate: the request's, else ``default_max_tokens``, else as many as the cap and the context allow."""
    req.check()
    limits.check_messages(getattr(req, "messages", None))
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n}; at most {limits.max_n}", param="n")
    asked = req.requested_max_tokens
    if asked is not None and asked > limits.max_tokens_cap:
        raise APIError(400, f"max_tokens={asked}; at most {limits.max_tokens_cap}", param="max_tokens")
    room = context_len - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens and the context holds {context_len}: {1 - room} tokens too many "
            f"to leave room for a reply; drop the oldest messages",
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
    """New raw text of one choice since the engine's last output (special tokens kept for chat), as the engine
    yields it; with the logprobs of its tokens when the request asked for them."""

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


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_none)


class DetokenizeResponse(BaseModel):
    prompt: str


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
