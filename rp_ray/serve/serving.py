"""The request logic between the HTTP routes and the engine, without Ray: request -> prompt ids, adapter and
sampling; engine deltas -> the OpenAI response or its stream of chunks. Chat completions, text completions on a raw
prompt, and vLLM's tokenize/detokenize. The characters a request can name, and the prompt each builds (character
cards, lorebooks, scene memory), are ``rp_ray.serve.personas``.

``rp_debug: true`` on a chat request (rp_ray's own field) adds ``"rp_ray": {"lore": [{"id", "name", "keys",
"tokens"}...], "scenes": [...], "system_prompt": ...}`` to the response, or to the first chunk of its stream: the
lorebook entries and scenes the prompt holds and its system prompt. OpenAI clients ignore the extra key.

``rp_ray.serve.protocol`` holds the wire types, this module what is done with them, ``rp_ray.serve.app`` the thin
routes (and the Ray handle to the engine).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rp_ray.config import ServeConfig
from rp_ray.data import Message
from rp_ray.llm.models import load_tokenizer
from rp_ray.llm.reply import ReplyStream
from rp_ray.llm.template import Template, chat_prompt_ids, get_template, stop_token_ids
from rp_ray.serve.characters import CharacterCard
from rp_ray.serve.personas import Assembly, Persona, Personas, leading_system
from rp_ray.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatSampling,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    Limits,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    check_limits,
    finish_reason,
)

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class PreparedChat:
    """What the engine is asked: the prompt ids, the adapter (None = base model) and the sampling."""

    prompt: list[int]
    adapter: str | None
    sampling: ChatSampling
    debug: dict[str, Any] | None = None  # the response's ``rp_ray`` field (``rp_debug``)


def split_system(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """(system prompt, the turns after it). Leading system messages are one system prompt, joined by blank lines
    (SillyTavern sends the character's description, scenario and more as separate ones); a system message after
    the first turn is a 400."""
    _, system, turns = leading_system(messages)
    return system, turns


def error_event(e: APIError) -> str:
    """An error inside a stream whose status line is already sent, reported in-band as OpenAI does."""
    return f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"


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


class ChatServing:
    """Chat and text completions for one serve config and its characters (the app's replica holds one): ``cards`` are
    the characters of characters_file, ``personas`` the plain data ``personas.load_personas`` gave (imported cards,
    lorebooks, scene corpora)."""

    def __init__(
        self,
        cfg: ServeConfig,
        cards: Mapping[str, CharacterCard],
        tok=None,
        personas: Mapping[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.tpl = get_template(cfg.model.template)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model.path, self.tpl)
        self.personas = Personas(cfg, cards, personas)
        self.vocab_size = len(self.tok)
        self.stop_ids = stop_token_ids(self.tok, self.tpl)  # sent with each request: the engine needs no tokenizer
        self.limits = Limits.from_config(cfg)
        self.created = int(time.time())
        self.count_tokens = functools.lru_cache(maxsize=4096)(self._count_tokens)

    def _count_tokens(self, text: str) -> int:
        """Tokens of a text in the prompt (lorebook entries, scenes), as the served tokenizer counts them."""
        return len(self.tok.encode(text, add_special_tokens=False)) if text else 0

    # -- models --------------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """The ``GET /v1/models`` body: the base model, the served adapters and the characters (those of
        characters_file with display_name, greeting, system_prompt, adapter; imported cards with display_name,
        greeting, alternate_greetings, adapter, spec)."""
        data = [self._model(self.cfg.base_name, "base")]
        data += [self._model(n, "adapter") for n in self.cfg.adapters]
        data += [self.model_entry(p) for p in self.personas.all()]
        return {"object": "list", "data": data}

    def _model(self, name: str, kind: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "rp_ray", "kind": kind}

    def model_entry(self, persona: Persona) -> dict[str, Any]:
        return self._model(persona.name, "character") | persona.entry()

    def import_card(self, raw: bytes, adapter: str | None = None, name: str | None = None) -> dict[str, Any]:
        """``POST /v1/characters``: add an uploaded card to the registry and serve it; its ``/v1/models`` entry."""
        return self.model_entry(self.personas.import_card(raw, adapter, name))

    def resolve_model(self, model: str) -> tuple[str | None, Persona | None]:
        """(adapter or None, character or None) of a request's ``model``; a 404 when nothing has that name."""
        if model == self.cfg.base_name:
            return None, None
        if model in self.cfg.adapters:
            return model, None
        card = self.personas.get(model)
        if card is None:
            raise APIError(
                404,
                f"model {model!r} does not exist; GET /v1/models lists the served ones",
                param="model",
                code="model_not_found",
            )
        return card.adapter, card

    # -- request -> engine input ---------------------------------------------------------------------------

    def assemble(self, messages: list[ChatMessage], persona: Persona | None) -> Assembly:
        """The system prompt and turns of a chat: the character's prompt built around the messages (see
        ``rp_ray.serve.personas``), or the messages' own leading system messages."""
        if persona is not None:
            return persona.assemble(messages, self.count_tokens)
        _, system, turns = leading_system(messages)
        return Assembly(system, turns)

    def chat_ids(self, chat: Assembly) -> list[int]:
        """The prompt ids of an assembled chat (the training template's layout)."""
        try:
            return chat_prompt_ids(
                self.tok,
                self.tpl,
                chat.system,
                [Message(m.role, m.content) for m in chat.turns],
                self.cfg.model.enable_thinking,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def chat_prompt(self, messages: list[ChatMessage], persona: Persona | None) -> list[int]:
        """The prompt ids of chat messages with the character's prompt built around them."""
        return self.chat_ids(self.assemble(messages, persona))

    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        """A raw prompt's ids with the served tokenizer; the template's BOS first unless the text starts with it."""
        ids = self.tok.encode(text, add_special_tokens=False) if text else []
        bos = self.tok.bos_token_id if self.tpl.bos else None
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def check_ids(self, ids: Iterable[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in the vocabulary (0 to {self.vocab_size - 1})", param=param)

    def _sampling(
        self, req: SamplingRequest, card: Persona | None, prompt: list[int], default_max_tokens: int | None
    ) -> ChatSampling:
        if req.logit_bias:
            self.check_ids((int(k) for k in req.logit_bias), "logit_bias")
        max_tokens = check_limits(req, self.limits, self.cfg.max_model_len, len(prompt), default_max_tokens)
        stop_ids = [] if getattr(req, "ignore_eos", False) else self.stop_ids
        return req.to_sampling(card.sampling if card else None, max_tokens, stop_ids)

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """The engine input of a chat request, or a 4xx ``APIError`` saying what is wrong with it."""
        adapter, persona = self.resolve_model(req.model)
        chat = self.assemble(req.messages, persona)
        prompt = self.chat_ids(chat)
        debug = chat.debug() if req.rp_debug else None
        return PreparedChat(prompt, adapter, self._sampling(req, persona, prompt, None), debug)

    def prepare_completion(self, req: CompletionRequest) -> PreparedChat:
        """The engine input of a text completion: the raw prompt (a card lends its adapter and sampling, never its
        system prompt), OpenAI's 16 tokens unless the request or the card says how many."""
        adapter, card = self.resolve_model(req.model)
        if isinstance(req.prompt, str):
            prompt = self.encode_text(req.prompt)
        else:
            self.check_ids(req.prompt, "prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        default = (card.sampling.max_tokens if card else None) or DEFAULT_COMPLETION_MAX_TOKENS
        return PreparedChat(prompt, adapter, self._sampling(req, card, prompt, default))

    # -- tokenize ------------------------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """vLLM's ``/tokenize``: a prompt as ``/v1/completions`` encodes it (the BOS unless ``add_special_tokens``
        is false), or messages as ``/v1/chat/completions`` builds their prompt."""
        _, card = self.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if req.messages is not None:
            if len(req.messages) > self.limits.max_messages:
                raise APIError(
                    400, f"{len(req.messages)} messages; at most {self.limits.max_messages}", param="messages"
                )
            ids = self.chat_prompt(req.messages, card)
        else:
            ids = self.encode_text(req.prompt, add_bos=req.add_special_tokens)
        strs = self.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.cfg.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(req.tokens))

    # -- logprobs ------------------------------------------------------------------------------------------

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

    @staticmethod
    def completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> tuple[CompletionLogprobs, int]:
        """OpenAI's text completion ``logprobs`` (the sampled token always among the top ones, as OpenAI has it)
        with text offsets from ``offset``; and the offset after them."""
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

    # -- engine output -> response ---------------------------------------------------------------------------

    def timeout_error(self) -> APIError:
        return APIError(504, f"no complete reply within {self.cfg.request_timeout_s} s", "timeout", code="timeout")

    async def collect(self, outputs: AsyncIterator[Delta], n: int) -> list[ChatChoice]:
        """The clean replies of the ``n`` chat choices (with their logprobs), once the engine is done."""
        replies = [ChatChoice(self.tpl) for _ in range(n)]
        async for d in outputs:
            replies[d.index].add(d)
        return replies

    def response(
        self, cid: str, req: ChatCompletionRequest, chat: PreparedChat, replies: list[ReplyStream]
    ) -> ChatCompletionResponse:
        asked = req.top_logprobs_asked is not None
        choices = [
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                logprobs=self.chat_logprobs(getattr(r, "logprobs", [])) if asked else None,
                finish_reason=finish_reason(r.finish_reason),
            )
            for i, r in enumerate(replies)
        ]
        return ChatCompletionResponse(
            id=cid,
            model=req.model,
            choices=choices,
            usage=Usage.of(len(chat.prompt), sum(r.tokens for r in replies)),
            rp_ray=chat.debug,
        )

    async def _events(
        self,
        outputs: AsyncIterator[Delta],
        cid: str,
        head: list[str],
        render: Callable[[Delta], Iterable[str]],
        tail: Callable[[], list[str]],
        deadline: float,
        cancel: Callable[[], None],
    ) -> AsyncIterator[str]:
        """Server-sent events: ``head``, the events ``render`` makes of each delta, ``tail()``, ``[DONE]``.

        ``cancel`` stops the engine request: when the client goes away or ``deadline`` (``time.monotonic``) passes.
        """
        for event in head:
            yield event
        try:
            async for d in outputs:
                for event in render(d):
                    yield event
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
        for event in tail():
            yield event
        yield DONE

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

        def tail() -> list[str]:
            if not req.include_usage:
                return []
            usage = Usage.of(len(chat.prompt), sum(r.tokens for r in replies))
            return [ChatCompletionChunk(id=cid, model=req.model, choices=[], usage=usage).sse()]

        return self._events(outputs, cid, head, render, tail, deadline, cancel)

    # -- text completions ------------------------------------------------------------------------------------

    async def collect_text(self, outputs: AsyncIterator[Delta], n: int) -> list[TextChoice]:
        choices = [TextChoice() for _ in range(n)]
        async for d in outputs:
            choices[d.index].add(d)
        return choices

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
                    logprobs=self.completion_logprobs(c.logprobs)[0] if asked else None,
                    finish_reason=finish_reason(c.finish_reason),
                )
                for i, c in enumerate(choices)
            ],
            usage=Usage.of(len(prepared.prompt), sum(c.tokens for c in choices)),
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
                lp, c.offset = self.completion_logprobs(d.logprobs or (), c.offset)
            c.add(d)
            if d.text or (lp and lp.tokens) or d.finish_reason is not None:
                choice = CompletionChoice(
                    index=d.index, text=d.text, logprobs=lp, finish_reason=finish_reason(d.finish_reason)
                )
                yield CompletionResponse(id=cid, model=req.model, choices=[choice]).sse()

        def tail() -> list[str]:
            if not req.include_usage:
                return []
            usage = Usage.of(len(prepared.prompt), sum(c.tokens for c in choices))
            return [CompletionResponse(id=cid, model=req.model, choices=[], usage=usage).sse()]

        return self._events(outputs, cid, [], render, tail, deadline, cancel)
