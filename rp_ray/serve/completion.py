"""``POST /v1/completions``: text completions on the raw prompt, as OpenAI's and vLLM's (SillyTavern's text
completion mode): the request and response types and the serving logic. A character lends its adapter and sampling,
never its prompt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema

from rp_ray.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    APIError,
    Delta,
    SamplingRequest,
    Stop,
    TokenLogprob,
    Usage,
    _none,
    _now,
    finish_reason,
)
from rp_ray.serve.serving import PreparedChat, Serving, usage

# -- requests ------------------------------------------------------------------------------------------------


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


class CompletionRequest(SamplingRequest):
    """A text completion (``POST /v1/completions``) on the raw prompt, as OpenAI's and vLLM's; the vLLM extras
    SillyTavern sends are typed too (those without an effect here are ignored)."""

    PROMPT_PARAM: ClassVar[str] = "prompt"
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
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

    def endpoint_params(self) -> dict[str, Any]:
        return dict(
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


# -- responses -------------------------------------------------------------------------------------------------


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


# -- serving ---------------------------------------------------------------------------------------------------


@dataclass
class TextChoice:
    """One text completion choice while it is generated: raw text (as vLLM cut it), tokens, finish, logprobs."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # where the next token's logprob entry starts (its text_offset)

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.tokens += d.tokens
        self.finish_reason = d.finish_reason or self.finish_reason
        if d.logprobs:
            self.logprobs.extend(d.logprobs)


def completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """OpenAI's text completion ``logprobs`` (the sampled token always among the top ones, as OpenAI has it) with
    text offsets from ``offset``; and the offset after them."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in lps:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        top = {t: v for _, t, v in lp.top}
        top.setdefault(lp.token, lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out, offset


class CompletionServing(Serving):
    """Text completions: the raw prompt in, the raw text (as vLLM cut it) out, whole or streamed."""

    completion_logprobs = staticmethod(completion_logprobs)

    def prepare_completion(self, req: CompletionRequest) -> PreparedChat:
        """The engine input of a text completion: the raw prompt (a character lends its adapter and sampling, never
        its prompt), OpenAI's 16 tokens unless the request or the character says how many."""
        adapter, character = self.resolve_model(req.model)
        if isinstance(req.prompt, str):
            prompt = self.encode_text(req.prompt)
        else:
            self.check_ids(req.prompt, "prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        default = (character.settings.sampling.max_tokens if character else None) or DEFAULT_COMPLETION_MAX_TOKENS
        return PreparedChat(prompt, adapter, self.sampling_params(req, character, prompt, default))

    def collect_text(self, outputs: AsyncIterator[Delta], n: int) -> Awaitable[list[TextChoice]]:
        return self.gather(outputs, [TextChoice() for _ in range(n)])

    def completion_response(
        self, cid: str, req: CompletionRequest, prepared: PreparedChat, choices: list[TextChoice]
    ) -> CompletionResponse:
        asked = req.top_logprobs_asked is not None
        return CompletionResponse(
            id=cid,
            model=req.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    logprobs=completion_logprobs(c.logprobs)[0] if asked else None,
                    finish_reason=finish_reason(c.finish_reason),
                )
                for i, c in enumerate(choices)
            ],
            usage=usage(prepared, choices),
        )

    def completion_stream(
        self,
        outputs: AsyncIterator[Delta],
        cid: str,
        req: CompletionRequest,
        prepared: PreparedChat,
        deadline: float,
        cancel: Callable[[], None],
    ) -> AsyncIterator[str]:
        """A text completion stream: a ``text_completion`` event per engine delta (its text, its tokens' logprobs
        when asked, the finish reason on the last), the usage event if asked, ``[DONE]``."""
        choices = [TextChoice() for _ in range(req.n)]
        asked = req.top_logprobs_asked is not None

        def render(d: Delta) -> Iterable[str]:
            c = choices[d.index]
            lp = None
            if asked:
                lp, c.offset = completion_logprobs(d.logprobs or (), c.offset)
            c.add(d)
            if d.text or (lp and lp.tokens) or d.finish_reason is not None:
                choice = CompletionChoice(
                    index=d.index, text=d.text, logprobs=lp, finish_reason=finish_reason(d.finish_reason)
                )
                yield CompletionResponse(id=cid, model=req.model, choices=[choice]).sse()

        def usage_event() -> str:
            return CompletionResponse(id=cid, model=req.model, choices=[], usage=usage(prepared, choices)).sse()

        return self._events(outputs, cid, [], render, usage_event if req.include_usage else None, deadline, cancel)
