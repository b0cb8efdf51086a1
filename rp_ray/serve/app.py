"""The Ray Serve application: an OpenAI-compatible HTTP ingress in front of one vLLM engine deployment.

    serve run serve_configs/tiny_llama3.yaml        # or: serve deploy serve_configs/<name>.yaml

Routes: ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /health`` (no key), and the
chat page at ``/``. The request's ``model`` names the base model, a served adapter, or a character card.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rp_ray.config import ConfigError, ServeConfig, format_validation_error
from rp_ray.serve.auth import key_matches, load_api_key, presented_key
from rp_ray.serve.characters import CharacterCard, apply_card, load_cards, resolve_adapter
from rp_ray.serve.engine import ChatEngine
from rp_ray.serve.protocol import (APIError, ChatCompletionRequest, Limits, check_limits, chunk_body, completion_body,
                                   completion_id, parse_request)
from rp_ray.reply import ReplyStream

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}
FINISH = {"stop": "stop", "length": "length", "abort": "stop", None: None}


def _error(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, code=code).body(), status_code=status, headers=headers)


def make_fastapi() -> FastAPI:
    api = FastAPI(title="rp_ray chat", version="0.1.0",
                  description="OpenAI-compatible role-play chat: base model, LoRA adapters and character cards.")

    @api.middleware("http")
    async def require_key(request: Request, call_next):
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        key = getattr(request.app.state, "api_key", None)
        presented = presented_key(request.headers.get("authorization"))
        if presented is None:
            # the page is opened by a browser: ask it for the key (Basic auth, key as password)
            challenge = 'Basic realm="rp_ray", charset="UTF-8"' if request.url.path == "/" else "Bearer"
            return _error(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error",
                          "missing_api_key", {"WWW-Authenticate": challenge})
        if key is None or not key_matches(presented, key):
            return _error(401, "invalid API key", "authentication_error", "invalid_api_key")
        return await call_next(request)

    @api.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        return _error(400, str(e.errors()[0].get("msg", e)), "invalid_request_error")

    return api


api = make_fastapi()
_REQUEST_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


async def read_body(request: Request, cap: int) -> Any:
    """The decoded JSON body, refusing more than ``cap`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"request body of {declared} bytes; at most {cap}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"request body over {cap} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


@serve.deployment(name="ChatIngress", max_ongoing_requests=64, max_queued_requests=256,
                  ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ChatIngress:
    def __init__(self, engine, cfg: dict[str, Any], cards: dict[str, dict]):
        from rp_ray.models import load_tokenizer
        from rp_ray.template import get_template, stop_token_ids

        self.engine = engine
        self.cfg = ServeConfig.model_validate(cfg)
        self.cards = {n: CharacterCard.model_validate(c) for n, c in cards.items()}
        self.tpl = get_template(self.cfg.model.template)
        self.tok = load_tokenizer(self.cfg.model.path, self.tpl)
        self.stop_ids = stop_token_ids(self.tok, self.tpl)  # sent with each request: the engine needs no tokenizer
        self.limits = Limits(max_messages=self.cfg.max_messages, max_tokens=self.cfg.max_tokens_cap,
                             max_n=self.cfg.max_n, max_body_bytes=self.cfg.max_body_bytes)
        api.state.api_key = load_api_key(self.cfg.api_key_env, self.cfg.api_key_file)
        self.created = int(time.time())

    # -- routes --------------------------------------------------------------------------------------------

    @api.get("/health", summary="200 while the engine is healthy, 503 otherwise (no API key needed)")
    async def health(self):
        try:
            await asyncio.wait_for(self.engine.check_health.remote(), 10)
        except Exception as e:  # noqa: BLE001 -- any failure means unhealthy
            return _error(503, f"engine unhealthy: {type(e).__name__}: {e}", "service_unavailable")
        return {"status": "ok"}

    @api.get("/v1/models", summary="The base model, the served adapters and the character cards")
    async def models(self):
        data = [self._model(self.cfg.base_name, "base", None)]
        data += [self._model(n, "adapter", None) for n in self.cfg.adapters]
        data += [self._model(n, "character", c) for n, c in self.cards.items()]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions", summary="OpenAI chat completions (stream or not)", openapi_extra=_REQUEST_SCHEMA)
    async def chat(self, request: Request):
        req = parse_request(await read_body(request, self.limits.max_body_bytes))
        adapter, messages, card = self._resolve(req)
        system = messages[0].content if messages[0].role == "system" else ""
        turns = messages[1:] if system or messages[0].role == "system" else messages
        if any(m.role == "system" for m in turns):
            raise APIError(400, "a system message may only come first", param="messages")
        from rp_ray.data import Message
        from rp_ray.template import chat_prompt_ids

        try:
            prompt = chat_prompt_ids(self.tok, self.tpl, system, [Message(m.role, m.content) for m in turns],
                                     self.cfg.model.enable_thinking)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        cap = check_limits(req, self.limits, self.cfg.max_model_len, len(prompt))
        params = self._params(req, card, cap)
        cid = completion_id()
        gen = self.engine.options(stream=True).generate.remote(prompt, params, adapter, cid, req.stream)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        first = await self._first(gen, deadline)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(first, gen, cid, req, len(prompt), include_usage, deadline),
                                     media_type="text/event-stream")
        try:
            replies = await asyncio.wait_for(self._collect(first, gen, req.n), deadline - time.monotonic())
        except asyncio.TimeoutError:
            gen.cancel()
            raise self._timeout() from None
        texts = [(r.text, FINISH.get(r.finish_reason, r.finish_reason)) for r in replies]
        return completion_body(cid, req.model, texts, len(prompt), sum(r.tokens for r in replies))

    @api.get("/", response_class=HTMLResponse, summary="The web chat page")
    async def page(self):
        return HTMLResponse(resources.files("rp_ray.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    # -- helpers -------------------------------------------------------------------------------------------

    def _model(self, name: str, kind: str, card: CharacterCard | None) -> dict[str, Any]:
        m = {"id": name, "object": "model", "created": self.created, "owned_by": "rp_ray", "kind": kind}
        if card is not None:
            m.update(display_name=card.display_name, greeting=card.greeting, system_prompt=card.system_prompt,
                     adapter=card.adapter)
        return m

    def _resolve(self, req: ChatCompletionRequest):
        """(adapter or None, messages with the card applied, card or None) for the request's model."""
        if req.model == self.cfg.base_name:
            return None, req.messages, None
        if req.model in self.cfg.adapters:
            return req.model, req.messages, None
        card = self.cards.get(req.model)
        if card is None:
            raise APIError(404, f"model {req.model!r} does not exist; GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        return card.adapter, apply_card(card, req.messages), card

    def _params(self, req: ChatCompletionRequest, card: CharacterCard | None, max_tokens: int) -> dict[str, Any]:
        cs = card.sampling if card else None

        def pick(name: str, default):
            v = getattr(req, name)
            if v is None and cs is not None:
                v = getattr(cs, name)
            return default if v is None else v

        if req.requested_max_tokens is None and cs is not None and cs.max_tokens:
            max_tokens = min(max_tokens, cs.max_tokens)
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return {"n": req.n, "temperature": pick("temperature", 1.0), "top_p": pick("top_p", 1.0),
                "top_k": pick("top_k", -1), "max_tokens": max_tokens, "seed": req.seed, "stop": stop,
                "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                "stop_token_ids": self.stop_ids}

    def _timeout(self) -> APIError:
        return APIError(504, f"no complete reply within {self.cfg.request_timeout_s} s", "timeout", code="timeout")

    async def _first(self, gen, deadline: float) -> list[list[dict]]:
        """The first engine output, awaited before any response starts, so a refused request still gets its 4xx/503."""
        try:
            return [await asyncio.wait_for(gen.__anext__(), deadline - time.monotonic())]
        except StopAsyncIteration:
            return []
        except asyncio.TimeoutError:
            gen.cancel()
            raise self._timeout() from None
        except BackPressureError:
            raise APIError(503, "the engine is at capacity; retry later", "service_unavailable", code="overloaded") from None
        except ValueError as e:  # vLLM's own sampling/prompt checks
            raise APIError(400, f"the engine refused the request: {str(e).splitlines()[-1][:500]}") from None

    async def _outputs(self, first: list[list[dict]], gen):
        for batch in first:
            for d in batch:
                yield d
        async for batch in gen:
            for d in batch:
                yield d

    async def _collect(self, first: list[list[dict]], gen, n: int) -> list[ReplyStream]:
        replies = [ReplyStream(self.tpl) for _ in range(n)]
        async for d in self._outputs(first, gen):
            replies[d["index"]].feed(d["text"], d["tokens"], d["finish_reason"])
        return replies

    async def _sse(self, first: list[list[dict]], gen, cid: str, req: ChatCompletionRequest, prompt_tokens: int,
                   include_usage: bool, deadline: float):
        def event(body: dict) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        replies = [ReplyStream(self.tpl) for _ in range(req.n)]
        for i in range(req.n):
            yield event(chunk_body(cid, req.model, i, {"role": "assistant", "content": ""}))
        try:
            async for d in self._outputs(first, gen):
                r = replies[d["index"]]
                delta = r.feed(d["text"], d["tokens"], d["finish_reason"])
                if delta:
                    yield event(chunk_body(cid, req.model, d["index"], {"content": delta}))
                if d["finish_reason"] is not None:
                    yield event(chunk_body(cid, req.model, d["index"], {}, FINISH.get(d["finish_reason"], d["finish_reason"])))
                if time.monotonic() > deadline:
                    gen.cancel()
                    yield event(self._timeout().body())
                    break
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop generating for it
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001 -- the status line is already sent; report in-band, as OpenAI does
            log.exception("stream %s failed", cid)
            yield event(APIError(500, f"generation failed: {type(e).__name__}", "server_error").body())
        if include_usage:
            done = sum(r.tokens for r in replies)
            yield event({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                                  "total_tokens": prompt_tokens + done}})
        yield "data: [DONE]\n\n"


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def build_app(args: dict[str, Any]) -> serve.Application:
    """The app from a serve config's ``args`` (a ServeConfig); called by ``serve run`` / ``serve deploy``.

    Paths are made absolute here, in the process that reads the config, and every adapter and card is checked
    before any replica starts, so a bad config fails at once with a message instead of as a crashing replica.
    """
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "serve config args", ServeConfig)) from None
    cfg.model.path = _abs(cfg.model.path)
    from rp_ray.models import check_model_dir

    check_model_dir(cfg.model.path)
    cfg.adapter_root = _abs(cfg.adapter_root)
    cfg.api_key_file = _abs(cfg.api_key_file)
    load_api_key(cfg.api_key_env, cfg.api_key_file)  # fail now, not as replicas that crash-loop
    reserved = {cfg.base_name}
    dirs = {}
    for name, folder in cfg.adapters.items():
        if name in reserved:
            raise ConfigError(f"adapter {name!r} has the base model's name")
        dirs[name] = str(resolve_adapter(cfg.adapter_root, name, folder))
    cards = {}
    if cfg.characters_file:
        cfg.characters_file = _abs(cfg.characters_file)
        for name, card in load_cards(cfg.characters_file).items():
            if name in reserved or name in dirs:
                raise ConfigError(f"character {name!r} has the name of the base model or an adapter")
            if card.adapter is not None and card.adapter not in dirs:
                raise ConfigError(f"character {name!r} speaks through adapter {card.adapter!r}, which is not in adapters: "
                                  f"{sorted(dirs)}")
            cards[name] = card.model_dump()
    conf = cfg.model_dump()
    engine = serve.deployment(ChatEngine, name="ChatEngine", max_ongoing_requests=64,
                              ray_actor_options={"num_cpus": 1}, health_check_period_s=10,
                              health_check_timeout_s=30).bind(conf, dirs)
    return ChatIngress.bind(engine, conf, cards)


def run_local(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "rp_ray") -> str:
    """Deploy the app on the connected Ray cluster (``serve run`` from Python) and return its base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg.model_dump()), name=name, route_prefix="/")
    return f"http://{host}:{port}"
