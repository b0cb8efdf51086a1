"""``POST /v1/chat/completions``: the request and response types and the serving logic. A request names a
character (its prompt built around the messages: ``rp_ray.character.catalog``), an adapter or the base model; the
engine's raw deltas (special tokens kept) become clean replies (``rp_ray.llm.reply``), whole or streamed.

``rp_debug: true`` (rp_ray's own field) adds ``"rp_ray": {"lore": [{"id", "name", "keys", "tokens"}...], "scenes":
[...], "system_prompt": ...}`` to the response, or to the first chunk of its stream: the lorebook entries and scenes
the prompt holds and its system prompt. OpenAI clients ignore the extra key.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from rp_ray.llm.reply import ReplyStream
from rp_ray.llm.template import Template
from rp_ray.serve.completion import CompletionServing
from rp_ray.serve.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    ChatMessage,
    Delta,
    SamplingRequest,
    Stop,
    TokenLogprob,
    Usage,
    _none,
    _now,
    finish_reason,
    parse_body,
)
from rp_ray.serve.serving import PreparedChat, usage

# -- requests ------------------------------------------------------------------------------------------------


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    rp_debug: bool = Field(
        False,
        description="rp_ray's own: the response (or the stream's first chunk) carries `rp_ray`: the lorebook "
        "entries, scenes and system prompt the prompt was built with.",
    )

    add_generation_prompt: bool = Field(
        True, description="vLLM's: false only with a final assistant message, which is then continued"
    )
    continue_final_message: bool = Field(
        False, description="vLLM's: continue the final assistant message (a final assistant message always is)"
    )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        continued = self.messages[-1].role == "assistant"
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "set add_generation_prompt: false to continue the final message", param="messages")
        if (self.continue_final_message or not self.add_generation_prompt) and not continued:
            raise APIError(
                400,
                "continuing a message (add_generation_prompt: false) needs a final assistant message",
                param="messages",
            )

    def endpoint_params(self) -> dict[str, Any]:
        # special tokens kept: gpt-oss channels are parsed out of the raw text (``ChatChoice``), never shown
        return dict(
            min_tokens=0,
            ignore_eos=False,
            skip_special_tokens=False,
            spaces_between_special_tokens=True,
            include_stop_str_in_output=False,
        )


def parse_request(payload: Any) -> ChatCompletionRequest:
    """A chat completion request (see :func:`parse_body`)."""
    return parse_body(payload, ChatCompletionRequest)


# -- responses -------------------------------------------------------------------------------------------------


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


# -- serving ---------------------------------------------------------------------------------------------------


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, used by the llama3 and gpt-oss tokenizers): character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class ChatChoice(ReplyStream):
    """One chat choice while it is generated: the clean reply (``ReplyStream``) and the logprobs of its tokens."""

    def __init__(self, tpl: Template):
        super().__init__(tpl)
        self.logprobs: list[TokenLogprob] = []

    def add(self, d: Delta) -> str:
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        return self.feed(d.text, d.tokens, d.finish_reason)


class ChatServing(CompletionServing):
    """One replica's whole API: chat completions here (request -> prompt ids, adapter and sampling; engine deltas ->
    the response or its stream), text completions, tokenize and the model list from its bases."""

    def prepare(self, req: ChatCompletionRequest, deadline: float | None = None) -> PreparedChat:
        """The engine input of a chat request, or a 4xx ``APIError`` saying what is wrong with it; a
        ``TimeoutError`` once ``deadline`` (``time.monotonic``) passes while its prompt is built."""
        adapter, character = self.resolve_model(req.model)
        prompt, ids = self.chat_prompt(req.messages, character, deadline)
        debug = prompt.debug() if req.rp_debug else None
        return PreparedChat(ids, adapter, self.sampling_params(req, character, ids, None), debug)

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """A token's own bytes (a byte-level BPE token may hold part of a UTF-8 character), else its text's."""
        raw = self.tok.convert_ids_to_tokens(token_id)
        dec = _byte_decoder()
        if isinstance(raw, str) and raw and all(c in dec for c in raw):
            return [dec[c] for c in raw]
        return list(text.encode("utf-8", errors="replace"))

    def chat_logprobs(self, lps: Sequence[TokenLogprob]) -> ChatLogprobs:
        """OpenAI's chat ``logprobs``: per token its text, bytes, logprob and the top alternatives."""
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=lp.token,
                    logprob=lp.logprob,
                    bytes=self.token_bytes(lp.id, lp.token),
                    top_logprobs=[TopLogprob(token=t, logprob=v, bytes=self.token_bytes(i, t)) for i, t, v in lp.top],
                )
                for lp in lps
            ]
        )

    def collect(self, outputs: AsyncIterator[Delta], n: int) -> Awaitable[list[ChatChoice]]:
        """The clean replies of the ``n`` chat choices (with their logprobs), once the engine is done."""
        return self.gather(outputs, [ChatChoice(self.tpl) for _ in range(n)])

    def response(
        self, cid: str, req: ChatCompletionRequest, chat: PreparedChat, replies: list[ChatChoice]
    ) -> ChatCompletionResponse:
        asked = req.top_logprobs_asked is not None
        choices = [
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                logprobs=self.chat_logprobs(r.logprobs) if asked else None,
                finish_reason=finish_reason(r.finish_reason),
            )
            for i, r in enumerate(replies)
        ]
        return ChatCompletionResponse(
            id=cid,
            model=req.model,
            choices=choices,
            usage=usage(chat, replies),
            rp_ray=chat.debug,
        )

    def stream(
        self,
        outputs: AsyncIterator[Delta],
        cid: str,
        req: ChatCompletionRequest,
        chat: PreparedChat,
        deadline: float,
        cancel: Callable[[], None],
    ) -> AsyncIterator[str]:
        """A chat stream: a role chunk per choice, clean content deltas (their concatenation is the reply the same
        request gets unstreamed; with their tokens' logprobs when asked), a closing chunk per choice, the usage
        chunk if asked, ``[DONE]``."""
        replies = [ChatChoice(self.tpl) for _ in range(req.n)]
        head = [
            ChatCompletionChunk.of(cid, req.model, i, DeltaMessage(role="assistant", content=""))
            .model_copy(update={"rp_ray": chat.debug if i == 0 else None})
            .sse()
            for i in range(req.n)
        ]

        def render(d: Delta) -> Iterable[str]:
            delta = replies[d.index].add(d)
            lp = self.chat_logprobs(d.logprobs) if d.logprobs else None
            if delta or lp:
                yield ChatCompletionChunk.of(cid, req.model, d.index, DeltaMessage(content=delta), logprobs=lp).sse()
            if d.finish_reason is not None:
                yield ChatCompletionChunk.of(
                    cid, req.model, d.index, DeltaMessage(), finish_reason(d.finish_reason)
                ).sse()

        def usage_event() -> str:
            return ChatCompletionChunk(id=cid, model=req.model, choices=[], usage=usage(chat, replies)).sse()

        return self._events(outputs, cid, head, render, usage_event if req.include_usage else None, deadline, cancel)
