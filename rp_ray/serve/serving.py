"""What every endpoint's serving logic shares, without Ray: the served tokenizer and template, the characters
(``rp_ray.character.catalog``), the request's ``model`` resolved to an adapter and a character, chat prompts and raw
prompts as token ids, the request turned into vLLM ``SamplingParams`` within the limits, ``GET /v1/models``, card
imports, vLLM's ``/tokenize`` and ``/detokenize``, and the server-sent event loop with its deadline. Text
completions (``completion``) and chat completions (``chat.ChatServing``, every endpoint) build on it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rp_ray.character.catalog import Catalog, Character, ImportRefused
from rp_ray.character.prompt import Prompt, Turn, leading_system
from rp_ray.config import ServeConfig
from rp_ray.llm.models import load_tokenizer
from rp_ray.llm.template import chat_prompt_ids, get_template, stop_token_ids, text_ids
from rp_ray.serve.protocol import (
    APIError,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    Limits,
    SamplingDefaults,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    check_limits,
)

if TYPE_CHECKING:
    from vllm import SamplingParams

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class PreparedChat:
    """What the engine is asked: the prompt ids, the adapter (None = base model) and the sampling."""

    prompt: list[int]
    adapter: str | None
    sampling: SamplingParams
    debug: dict[str, Any] | None = None  # the response's ``rp_ray`` field (``rp_debug``)


def usage(prepared: PreparedChat, choices: Sequence[Any]) -> Usage:
    """The usage of a reply whose choices (chat or text) counted their tokens."""
    return Usage.of(len(prepared.prompt), sum(c.tokens for c in choices))


def error_event(e: APIError) -> str:
    """An error inside a stream whose status line is already sent, reported in-band as OpenAI does."""
    return f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"


class Serving:
    """One serve config, its tokenizer and its characters (``data``: what ``catalog.load_catalog`` gave)."""

    def __init__(self, cfg: ServeConfig, data: Mapping[str, Any] | None = None, tok=None):
        self.cfg = cfg
        self.tpl = get_template(cfg.model.template)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model.path, self.tpl)
        self.catalog = Catalog(cfg, data)
        self.vocab_size = len(self.tok)
        self.stop_ids = stop_token_ids(self.tok, self.tpl)
        self.limits = Limits.from_config(cfg)
        self.created = int(time.time())
        self.count_tokens = functools.lru_cache(maxsize=4096)(self._count_tokens)
        # no token spells more characters than the longest one in the vocabulary (byte-level: a character a byte at
        # most), so a prompt of more than max_model_len x this many characters cannot fit whatever its tokens
        self.max_prompt_chars = self.cfg.max_model_len * max(map(len, self.tok.get_vocab()))

    def _count_tokens(self, text: str) -> int:
        """Tokens of a text in the prompt (lorebook entries, scenes), as the served tokenizer counts them."""
        return len(text_ids(self.tok, text, self.cfg.allow_special_tokens_in_text))

    # -- models --------------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """The ``GET /v1/models`` body: the base model, the served adapters and the characters (``Character.entry``)."""
        data = [self._model(self.cfg.base_name, "base")]
        data += [self._model(n, "adapter") for n in self.cfg.adapters]
        data += [self.model_entry(c) for c in self.catalog.all()]
        return {"object": "list", "data": data}

    def _model(self, name: str, kind: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "rp_ray", "kind": kind}

    def model_entry(self, character: Character) -> dict[str, Any]:
        return self._model(character.name, "character") | character.entry()

    def import_card(self, raw: bytes, adapter: str | None = None, name: str | None = None) -> dict[str, Any]:
        """``POST /v1/characters``: add an uploaded card to the registry and serve it; its ``/v1/models`` entry."""
        try:
            return self.model_entry(self.catalog.import_card(raw, adapter, name))
        except ImportRefused as e:
            raise APIError(e.status, str(e), param=e.param, code=e.code) from None

    def resolve_model(self, model: str) -> tuple[str | None, Character | None]:
        """(adapter or None, character or None) of a request's ``model``; a 404 when nothing has that name."""
        if model == self.cfg.base_name:
            return None, None
        if model in self.cfg.adapters:
            return model, None
        character = self.catalog.get(model)
        if character is None:
            raise APIError(
                404,
                f"model {model!r} does not exist; GET /v1/models lists the served ones",
                param="model",
                code="model_not_found",
            )
        adapter = character.settings.adapter
        if adapter is not None and adapter not in self.cfg.adapters:  # unloaded at run time
            raise APIError(
                404,
                f"character {model!r} speaks through adapter {adapter!r}, which is no longer served; load it again "
                f"(POST /v1/load_lora_adapter) or bind the card to a served one",
                param="model",
                code="model_not_found",
            )
        return adapter, character

    # -- prompts -------------------------------------------------------------------------------------------

    def chat_prompt(
        self, messages: Sequence[Turn], character: Character | None, deadline: float | None = None
    ) -> tuple[Prompt, list[int]]:
        """A chat's prompt (the character's built around the messages, or the messages' own leading system
        messages) and its ids in the training template's layout; a 400 for messages no prompt is built from (their
        macros expanded may be at most ``max_body_bytes`` characters); past ``deadline`` (``time.monotonic``) a
        ``TimeoutError``."""
        try:
            if character is not None:
                prompt = character.prompt(messages, self.count_tokens, self.limits.max_body_bytes, deadline)
            else:
                prompt = Prompt(*leading_system(messages)[1:])
            if deadline is not None and time.monotonic() > deadline:  # the answer is a 504 by now: skip tokenizing
                raise TimeoutError("the prompt's deadline passed before it was tokenized")
            self.check_prompt_chars(prompt)
            ids = chat_prompt_ids(
                self.tok,
                self.tpl,
                prompt.system,
                prompt.turns,
                self.cfg.model.enable_thinking,
                special_tokens_in_text=self.cfg.allow_special_tokens_in_text,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return prompt, ids

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

    def sampling_params(
        self, req: SamplingRequest, character: Character | None, prompt: list[int], default_max_tokens: int | None
    ) -> SamplingParams:
        """The request's ``SamplingParams``, once its limits are checked (a 400 names what is over them)."""
        if req.logit_bias:
            self.check_ids((int(k) for k in req.logit_bias), "logit_bias")
        max_tokens = check_limits(req, self.limits, self.cfg.max_model_len, len(prompt), default_max_tokens)
        stop_ids = [] if getattr(req, "ignore_eos", False) else self.stop_ids
        sampling = character.settings.sampling if character else None
        return req.to_sampling_params(SamplingDefaults(max_tokens, stop_ids, sampling))

    def check_prompt_chars(self, prompt: Prompt) -> None:
        """A 400, before tokenizing, for a prompt (a character's with its macros expanded) of more characters than
        ``max_model_len`` tokens can spell: tokenizing megabytes only to refuse them costs a replica seconds."""
        chars = len(prompt.system) + sum(len(t.content) for t in prompt.turns)
        if chars > self.max_prompt_chars:
            raise ValueError(
                f"the prompt is {chars:,} characters (card, lorebook and messages with their macros expanded): more "
                f"than max_model_len={self.cfg.max_model_len} tokens can hold; send a shorter chat"
            )

    def tokenize(self, req: TokenizeRequest, deadline: float | None = None) -> TokenizeResponse:
        """vLLM's ``/tokenize``: a prompt as ``/v1/completions`` encodes it (the BOS unless ``add_special_tokens``
        is false), or messages as ``/v1/chat/completions`` builds their prompt."""
        _, character = self.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if req.messages is not None:
            self.limits.check_messages(req.messages)
            ids = self.chat_prompt(req.messages, character, deadline)[1]
        else:
            ids = self.encode_text(req.prompt, add_bos=req.add_special_tokens)
        strs = self.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.cfg.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(req.tokens))

    # -- replies -------------------------------------------------------------------------------------------

    @staticmethod
    async def gather(outputs: AsyncIterator[Delta], choices: list[Any]) -> list[Any]:
        """The ``choices`` (chat or text) once each has taken its deltas and the engine is done."""
        async for d in outputs:
            choices[d.index].add(d)
        return choices

    # -- streams -------------------------------------------------------------------------------------------

    def timeout_error(self) -> APIError:
        return APIError(504, f"no complete reply within {self.cfg.request_timeout_s} s", "timeout", code="timeout")

    def prompt_timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the prompt was not built within prompt_timeout_s={self.cfg.prompt_timeout_s} s (lorebook scans, scene "
            f"memory, macros and tokenization); send a shorter chat, or use a character with a smaller lorebook",
            "timeout",
            code="prompt_timeout",
        )

    async def _events(
        self,
        outputs: AsyncIterator[Delta],
        cid: str,
        head: list[str],
        render: Callable[[Delta], Iterable[str]],
        usage: Callable[[], str] | None,
        deadline: float,
        cancel: Callable[[], None],
    ) -> AsyncIterator[str]:
        """Server-sent events: ``head``, the events ``render`` makes of each delta, the ``usage()`` event (when the
        request asked for it: ``stream_options.include_usage``), ``[DONE]``.

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
        if usage is not None:
            yield usage()
        yield DONE
