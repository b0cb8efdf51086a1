"""The chat logic between the HTTP routes and the engine, without Ray: request -> prompt ids, adapter and sampling;
engine deltas -> the OpenAI response or its stream of chunks.

``rp_ray.serve.protocol`` holds the wire types, this module what is done with them, ``rp_ray.serve.app`` the thin
routes (and the Ray handle to the engine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rp_ray.config import ServeConfig
from rp_ray.data import Message
from rp_ray.models import load_tokenizer
from rp_ray.reply import ReplyStream
from rp_ray.serve.characters import CharacterCard, apply_card
from rp_ray.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatSampling,
    Delta,
    DeltaMessage,
    Limits,
    Usage,
    check_limits,
    finish_reason,
)
from rp_ray.template import chat_prompt_ids, get_template, stop_token_ids

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class PreparedChat:
    """What the engine is asked: the prompt ids, the adapter (None = base model) and the sampling."""

    prompt: list[int]
    adapter: str | None
    sampling: ChatSampling


def split_system(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """(system prompt, the turns after it); a system message anywhere but first is a 400."""
    has_system = messages[0].role == "system"
    system = messages[0].content if has_system else ""
    turns = messages[1:] if has_system else messages
    if any(m.role == "system" for m in turns):
        raise APIError(400, "a system message may only come first", param="messages")
    return system, turns


def error_event(e: APIError) -> str:
    """An error inside a stream whose status line is already sent, reported in-band as OpenAI does."""
    return f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"


class ChatServing:
    """Chat completions for one serve config and its character cards (the ingress holds one)."""

    def __init__(self, cfg: ServeConfig, cards: Mapping[str, CharacterCard], tok=None):
        self.cfg = cfg
        self.cards = dict(cards)
        self.tpl = get_template(cfg.model.template)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model.path, self.tpl)
        self.stop_ids = stop_token_ids(self.tok, self.tpl)  # sent with each request: the engine needs no tokenizer
        self.limits = Limits.from_config(cfg)
        self.created = int(time.time())

    # -- models --------------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """The ``GET /v1/models`` body: the base model, the served adapters and the character cards."""
        data = [self._model(self.cfg.base_name, "base", None)]
        data += [self._model(n, "adapter", None) for n in self.cfg.adapters]
        data += [self._model(n, "character", c) for n, c in self.cards.items()]
        return {"object": "list", "data": data}

    def _model(self, name: str, kind: str, card: CharacterCard | None) -> dict[str, Any]:
        m = {"id": name, "object": "model", "created": self.created, "owned_by": "rp_ray", "kind": kind}
        if card is not None:
            m.update(
                display_name=card.display_name,
                greeting=card.greeting,
                system_prompt=card.system_prompt,
                adapter=card.adapter,
            )
        return m

    # -- request -> engine input ---------------------------------------------------------------------------

    def resolve(self, req: ChatCompletionRequest) -> tuple[str | None, list[ChatMessage], CharacterCard | None]:
        """(adapter or None, messages with the card applied, card or None) for the request's model."""
        if req.model == self.cfg.base_name:
            return None, req.messages, None
        if req.model in self.cfg.adapters:
            return req.model, req.messages, None
        card = self.cards.get(req.model)
        if card is None:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; GET /v1/models lists the served ones",
                param="model",
                code="model_not_found",
            )
        return card.adapter, apply_card(card, req.messages), card

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """The engine input of a request, or a 4xx ``APIError`` saying what is wrong with it."""
        adapter, messages, card = self.resolve(req)
        system, turns = split_system(messages)
        try:
            prompt = chat_prompt_ids(
                self.tok, self.tpl, system, [Message(m.role, m.content) for m in turns], self.cfg.model.enable_thinking
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = check_limits(req, self.limits, self.cfg.max_model_len, len(prompt))
        sampling = req.to_sampling(card.sampling if card else None, max_tokens, self.stop_ids)
        return PreparedChat(prompt, adapter, sampling)

    # -- engine output -> response ---------------------------------------------------------------------------

    def timeout_error(self) -> APIError:
        return APIError(504, f"no complete reply within {self.cfg.request_timeout_s} s", "timeout", code="timeout")

    async def collect(self, outputs: AsyncIterator[Delta], n: int) -> list[ReplyStream]:
        """The clean replies of the ``n`` choices, once the engine is done."""
        replies = [ReplyStream(self.tpl) for _ in range(n)]
        async for d in outputs:
            replies[d.index].feed(d.text, d.tokens, d.finish_reason)
        return replies

    def response(
        self, cid: str, req: ChatCompletionRequest, chat: PreparedChat, replies: list[ReplyStream]
    ) -> ChatCompletionResponse:
        choices = [
            ChatCompletionChoice(
                index=i, message=AssistantMessage(content=r.text), finish_reason=finish_reason(r.finish_reason)
            )
            for i, r in enumerate(replies)
        ]
        return ChatCompletionResponse(
            id=cid, model=req.model, choices=choices, usage=Usage.of(len(chat.prompt), sum(r.tokens for r in replies))
        )

    async def stream(
        self,
        outputs: AsyncIterator[Delta],
        cid: str,
        req: ChatCompletionRequest,
        chat: PreparedChat,
        deadline: float,
        cancel: Callable[[], None],
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, clean content deltas (their concatenation is the reply the
        same request gets unstreamed), a closing chunk per choice, the usage chunk if asked, ``[DONE]``.

        ``cancel`` stops the engine request: when the client goes away or ``deadline`` (``time.monotonic``) passes.
        """
        replies = [ReplyStream(self.tpl) for _ in range(req.n)]
        for i in range(req.n):
            yield ChatCompletionChunk.of(cid, req.model, i, DeltaMessage(role="assistant", content="")).sse()
        try:
            async for d in outputs:
                delta = replies[d.index].feed(d.text, d.tokens, d.finish_reason)
                if delta:
                    yield ChatCompletionChunk.of(cid, req.model, d.index, DeltaMessage(content=delta)).sse()
                if d.finish_reason is not None:
                    yield ChatCompletionChunk.of(
                        cid, req.model, d.index, DeltaMessage(), finish_reason(d.finish_reason)
                    ).sse()
                if time.monotonic() > deadline:
                    cancel()
                    yield error_event(self.timeout_error())
                    break
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop generating for it
            cancel()
            raise
        except Exception as e:
            log.exception("stream %s failed", cid)
            yield error_event(APIError(500, f"generation failed: {type(e).__name__}", "server_error"))
        if req.include_usage:
            usage = Usage.of(len(chat.prompt), sum(r.tokens for r in replies))
            yield ChatCompletionChunk(id=cid, model=req.model, choices=[], usage=usage).sse()
        yield DONE
