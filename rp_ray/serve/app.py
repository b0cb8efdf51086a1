"""The Ray Serve application: one deployment, an OpenAI-compatible HTTP server holding one vLLM engine.

    serve run serve_configs/tiny_llama3.yaml        # or: serve deploy serve_configs/<name>.yaml

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and not), ``GET /v1/models``,
``POST /tokenize`` and ``POST /detokenize`` (vLLM's), ``POST /v1/characters`` (import a card file into the card
registry), ``GET /health`` (no key), and the chat page at ``/``: what OpenAI clients and SillyTavern (chat and text
completion modes) call. The request's ``model`` names the base model, a served adapter, or a character.
The routes are thin (the serving logic is ``rp_ray.serve.chat``, see the package docstring).

Hostile callers: routes taking JSON require ``Content-Type: application/json`` and the card import the file's bytes as
``application/octet-stream``, ``image/png`` or ``application/json`` (415 otherwise): an HTML form on another site
can send none of these without a CORS preflight, which this app never grants; write requests from another site's
page (its ``Origin``) are refused with 403 (``auth.SameOrigin``). A request's prompt is built in a worker thread
within ``prompt_timeout_s`` (504 past it), so a slow one (a large lorebook, long macros) does not hold up the event
loop that streams every other reply of the replica. From Python,
:func:`deploy_config` deploys a serve config as ``serve run`` does and :func:`run_local` the default app for a
``ServeConfig``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import RunTarget
from starlette.exceptions import HTTPException as StarletteHTTPException

from rp_ray.character.card import MAX_PNG_BYTES, CardError
from rp_ray.character.catalog import load_catalog, load_characters_file
from rp_ray.config import ConfigError, ServeConfig, format_validation_error
from rp_ray.llm.hub import resolve_model
from rp_ray.llm.models import check_model_dir
from rp_ray.llm.vllm_engine import max_lora_rank
from rp_ray.serve.adapters import AdapterRegistry, check_rank, resolve_adapter
from rp_ray.serve.auth import RequireKey, SameOrigin, error_response, load_api_key
from rp_ray.serve.chat import ChatCompletionRequest, ChatServing
from rp_ray.serve.completion import CompletionRequest
from rp_ray.serve.deployments import APP_IMPORT_PATH, deployment_overrides, load_serve_config, merged_options
from rp_ray.serve.engine import ChatEngine
from rp_ray.serve.metrics import CountRequests, ServeMetrics
from rp_ray.serve.protocol import (
    APIError,
    Delta,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
    completion_id,
    parse_body,
)
from rp_ray.serve.serving import PreparedChat

log = logging.getLogger(__name__)
UNHEALTHY = "engine unhealthy (details in the replica's log)"
JSON_TYPE = "application/json"
# the card file's bytes; none of these is a type an HTML form posts, so another site's page cannot import a card
CARD_TYPES = ("application/octet-stream", "image/png", JSON_TYPE)
T = TypeVar("T")


api = FastAPI(
    title="rp_ray chat",
    version="0.1.0",
    description="OpenAI-compatible role-play chat: base model, LoRA adapters and character cards.",
)
api.add_middleware(RequireKey)
api.add_middleware(SameOrigin)  # before the key: a browser sends the chat page's Basic auth to any site's request
api.add_middleware(CountRequests)  # outermost: 401s and 403s count too


@api.exception_handler(APIError)
async def api_error(_: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def http_error(_: Request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "invalid_request_error")


@api.exception_handler(RequestValidationError)
async def validation_error(_: Request, e: RequestValidationError):
    return error_response(400, str(e.errors()[0].get("msg", e)), "invalid_request_error")


_SCHEMAS: dict[str, Any] = {}  # the request models' nested schemas, listed under components/schemas


def _body(model: type) -> dict[str, Any]:
    """``openapi_extra`` documenting a route's JSON body as ``model`` (the routes read the body themselves)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _SCHEMAS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi() -> dict[str, Any]:
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes, servers=api.servers
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


async def read_raw(request: Request, cap: int) -> bytes:
    """The body's bytes, refusing more than ``cap`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"request body of {declared} bytes; at most {cap}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"request body over {cap} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_media_type(request: Request, allowed: Collection[str], what: str) -> None:
    """A 415 unless the request's Content-Type (its media type, parameters ignored) is one of ``allowed``."""
    got = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if got not in allowed:
        raise APIError(
            415,
            f"Content-Type {got or '(none)'}: {what} with Content-Type {' or '.join(allowed)}; the types an HTML form "
            f"sends are refused so that another site's page cannot post here",
            code="unsupported_media_type",
        )


@serve.deployment(name="ChatServer", **merged_options()["ChatServer"])
@serve.ingress(api)
class ChatServer:
    """The whole app in one replica: the HTTP routes and the vLLM engine they call in-process.

    A request goes from Serve's HTTP proxy (or HAProxy) straight to this replica, and its streamed deltas go from
    the engine to the client without crossing another Ray actor. Serve's ``max_ongoing_requests`` /
    ``max_queued_requests`` of this deployment bound the engine's load (a full queue is a 503), and Serve's health
    check asks the engine (``check_health``), so a replica whose engine died is replaced.
    """

    def __init__(self, cfg: dict[str, Any], adapter_dirs: dict[str, str], characters: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)
        self.serving = ChatServing(self.cfg, characters)
        api.state.api_key = load_api_key(self.cfg.api_key_env, self.cfg.api_key_file)
        self.engine = ChatEngine(self.cfg, adapter_dirs)
        api.state.metrics = ServeMetrics()
        # the served adapters: the configured ones (fixed) and those loaded at run time (the registry's); the
        # serving logic and the catalog read the table from cfg.adapters
        self.configured = set(adapter_dirs)
        self.cfg.adapters = dict(adapter_dirs)
        self.registry = AdapterRegistry(self.cfg.adapter_root)

    async def check_health(self) -> None:
        """Called by Serve; raising marks the replica unhealthy and Serve replaces it."""
        await self.engine.check_health()

    # -- routes --------------------------------------------------------------------------------------------

    @api.get("/health", summary="200 while the engine is healthy, 503 otherwise (no API key needed)")
    async def health(self):
        try:
            await asyncio.wait_for(self.engine.check_health(), 10)
        except Exception as e:  # noqa: BLE001 -- any failure means unhealthy
            # the exception's text stays in the replica's log: it may name paths and internals
            log.warning("health check failed: %s: %s", type(e).__name__, e)
            return error_response(503, UNHEALTHY, "service_unavailable")
        return {"status": "ok"}

    @api.get("/v1/models", summary="The base model, the served adapters and the characters")
    async def models(self):
        await self._sync_adapters()
        return self.serving.models()

    @api.post(
        "/v1/load_lora_adapter",
        summary="vLLM's: serve a peft adapter folder under adapter_root as lora_name, on every replica, until unloaded",
        openapi_extra=_body(LoadLoraAdapterRequest),
    )
    async def load_lora_adapter(self, request: Request):
        req = await self._read(request, LoadLoraAdapterRequest)
        name = req.lora_name
        if self.engine.max_lora_rank is None:
            raise APIError(400, "this app's engine serves no adapters (LoRA is off): configure one in adapters")
        if name in self.serving.catalog.taken or self.serving.catalog.get(name):  # taken: base, adapters, characters
            raise APIError(400, f"the name {name!r} is taken by a served model; unload it first", param="lora_name")
        try:
            path = str(resolve_adapter(self.cfg.adapter_root, name, req.lora_path))
            check_rank(name, path, self.engine.max_lora_rank)
        except (CardError, ValueError, OSError) as e:  # OSError: a path the filesystem refuses (too long, ...)
            raise APIError(400, str(e), param="lora_path") from None
        try:
            await self.engine.add_adapter(name, path)
        except Exception as e:  # noqa: BLE001 -- vLLM's own checks of the adapter (its modules, its weights)
            msg = f"the engine cannot load adapter {name!r}: {type(e).__name__}: {e}"
            raise APIError(400, msg, param="lora_path") from None
        self.cfg.adapters[name] = path
        self.registry.update(lambda table: table.__setitem__(name, path))
        log.info("adapter %s loaded from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @api.post(
        "/v1/unload_lora_adapter",
        summary="vLLM's: stop serving an adapter loaded at run time, on every replica",
        openapi_extra=_body(UnloadLoraAdapterRequest),
    )
    async def unload_lora_adapter(self, request: Request):
        name = (await self._read(request, UnloadLoraAdapterRequest)).lora_name
        if name in self.configured:
            raise APIError(
                400, f"adapter {name!r} is in the serve config's adapters; it cannot be unloaded", param="lora_name"
            )
        if name not in self.cfg.adapters:
            raise APIError(
                404, f"no adapter {name!r} was loaded at run time", param="lora_name", code="model_not_found"
            )
        self.registry.update(lambda table: table.pop(name, None))
        await self._drop_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @api.post(
        "/v1/characters",
        status_code=201,
        summary="Import a character card file (Character Card V1/V2/V3 JSON, or a PNG carrying one) into the card "
        "registry and serve it at once; the answer is its /v1/models entry",
        openapi_extra={
            "parameters": [
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": text}
                for name, text in (
                    ("adapter", "A served adapter the character speaks through (kept in the card)"),
                    ("name", "The model name requests use (default: the character's name as a slug)"),
                )
            ],
            "requestBody": {
                "required": True,
                "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in CARD_TYPES},
            },
        },
    )
    async def import_character(self, request: Request):
        check_media_type(request, CARD_TYPES, "send the card file's bytes")
        raw = await read_raw(request, MAX_PNG_BYTES)
        q = request.query_params
        entry = self.serving.import_card(raw, q.get("adapter") or None, q.get("name") or None)
        return JSONResponse(entry, status_code=201)

    @api.post(
        "/v1/chat/completions",
        summary="OpenAI chat completions (stream or not)",
        openapi_extra=_body(ChatCompletionRequest),
    )
    async def chat(self, request: Request):
        req = await self._read(request, ChatCompletionRequest)
        s = self.serving
        prepared = await self._build(lambda deadline: s.prepare(req, deadline))
        return await self._complete(request, req, prepared, completion_id(), s.stream, s.collect, s.response)

    @api.post(
        "/v1/completions",
        summary="OpenAI text completions on the raw prompt (stream or not)",
        openapi_extra=_body(CompletionRequest),
    )
    async def completions(self, request: Request):
        req = await self._read(request, CompletionRequest)
        s = self.serving
        prepared, cid = await self._build(lambda _: s.prepare_completion(req)), completion_id("cmpl")
        stream, collect, respond = s.completion_stream, s.collect_text, s.completion_response
        return await self._complete(request, req, prepared, cid, stream, collect, respond)

    @api.post(
        "/tokenize",
        summary="vLLM's tokenize: a prompt's ids, or the prompt ids chat messages make",
        openapi_extra=_body(TokenizeRequest),
    )
    async def tokenize(self, request: Request):
        req = await self._read(request, TokenizeRequest)
        return self._json(await self._build(lambda deadline: self.serving.tokenize(req, deadline)))

    @api.post("/detokenize", summary="vLLM's detokenize: token ids to text", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(self, request: Request):
        return self._json(self.serving.detokenize(await self._read(request, DetokenizeRequest)))

    @api.get("/", response_class=HTMLResponse, summary="The web chat page")
    async def page(self):
        return HTMLResponse(resources.files("rp_ray.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    # -- the engine ----------------------------------------------------------------------------------------

    async def _sync_adapters(self) -> None:
        """Load and drop what other replicas loaded and unloaded at run time (when the registry file changed)."""
        if not self.registry.changed():
            return
        listed = {n: p for n, p in self.registry.read().items() if n not in self.configured}
        for name in [
            n for n in self.cfg.adapters if n not in self.configured and listed.get(n) != self.cfg.adapters[n]
        ]:
            await self._drop_adapter(name)
        for name, path in listed.items():
            if name in self.cfg.adapters:
                continue
            try:
                check_rank(name, path, self.engine.max_lora_rank or 0)
                await self.engine.add_adapter(name, path)
            except Exception as e:  # noqa: BLE001 -- this replica cannot serve it; the others may
                log.warning("adapter %s from %s is not served: %s", name, path, e)
                continue
            self.cfg.adapters[name] = path
            log.info("adapter %s loaded from %s (by another replica)", name, path)

    async def _drop_adapter(self, name: str) -> None:
        self.cfg.adapters.pop(name, None)
        await self.engine.remove_adapter(name)
        log.info("adapter %s unloaded", name)

    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        """The JSON body validated as ``model`` (see ``parse_body``), refusing more than ``max_body_bytes`` before
        reading them all (a 413 whatever the type), then any Content-Type but JSON (415); the runtime adapters synced
        first."""
        await self._sync_adapters()
        raw = await read_raw(request, self.serving.limits.max_body_bytes)
        check_media_type(request, (JSON_TYPE,), "send the body as JSON")
        try:
            payload = json.loads(raw)
            json.dumps(payload, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape (\ud800) is no text
        except ValueError as e:  # not JSON, not UTF-8, a lone surrogate, an integer of more digits than Python converts
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body is JSON nested too deeply", code="invalid_json") from None
        return parse_body(payload, model)

    async def _build(self, build: Callable[[float], T]) -> T:
        """``build(deadline)`` (a request's prompt) in a worker thread: Serve runs this replica's routes on one event
        loop, which must keep streaming the other replies meanwhile. Past ``prompt_timeout_s`` the answer is a 504;
        the thread cannot be stopped, so the builders check the deadline where they loop, and the late result is
        dropped."""
        timeout = self.cfg.prompt_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(build, time.monotonic() + timeout), timeout)
        except TimeoutError:  # waiting gave up, or the builder saw its deadline pass
            raise self.serving.prompt_timeout_error() from None

    @staticmethod
    def _json(body) -> Response:
        return Response(body.model_dump_json(), media_type="application/json")

    async def _complete(
        self, request: Request, req, prepared: PreparedChat, cid: str, stream, collect, respond
    ) -> Response:
        """Run a chat or text completion on the engine: its event stream, or, once the engine is done, its
        response; past the deadline the engine request is cancelled (a whole reply's answer is then a 504). Its
        latency and tokens go to the metrics, under the (served) model it names."""
        request.state.model = req.model
        gen = self.engine.generate(prepared.prompt, prepared.sampling, prepared.adapter, cid)
        gen = api.state.metrics.observe(gen, request.url.path, req.model, len(prepared.prompt))
        deadline = time.monotonic() + self.cfg.request_timeout_s

        def cancel() -> None:
            self.engine.cancel(cid)

        outputs = await self._peek(gen, cancel, deadline)
        if req.stream:
            events = stream(outputs, cid, req, prepared, deadline, cancel)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            choices = await asyncio.wait_for(collect(outputs, req.n), deadline - time.monotonic())
        except TimeoutError:
            cancel()
            raise self.serving.timeout_error() from None
        return self._json(respond(cid, req, prepared, choices))

    async def _peek(self, gen: AsyncIterator[Delta], cancel: Callable[[], None], deadline: float):
        """Await the engine's first delta before any response starts, so a refused request still gets its
        4xx/504; then every delta, the first included."""
        try:
            first = [await asyncio.wait_for(gen.__anext__(), deadline - time.monotonic())]
        except StopAsyncIteration:
            first = []
        except TimeoutError:
            cancel()
            raise self.serving.timeout_error() from None
        except ValueError as e:  # vLLM's own sampling/prompt checks
            raise APIError(400, f"the engine refused the request: {str(e).splitlines()[-1][:500]}") from None

        async def deltas() -> AsyncIterator[Delta]:
            for d in first:
                yield d
            if first:
                async for d in gen:
                    yield d

        return deltas()


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def build_app(args: dict[str, Any]) -> serve.Application:
    """The app for a serve config's ``args`` (a ServeConfig): ``import_path: rp_ray.serve.app:build_app``, called by
    ``serve run`` / ``serve deploy`` with its ``args`` (Serve then applies the config's ``deployments:`` over the
    defaults; an application builder takes exactly one parameter). See :func:`app_for`."""
    return app_for(args)


def app_for(args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The app for a serve config's ``args``; from Python each deployment gets the default options of
    ``rp_ray.serve.deployments`` and ``deployments[name]`` (a serve config's entry: options it sets) over them.

    Paths are made absolute here, in the process that reads the config, and every adapter, card, lorebook and scene
    corpus is read and checked before any replica starts, so a bad config fails at once with a message instead of
    as a crashing replica; the replicas get them as plain data.
    """
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "serve config args", ServeConfig)) from None
    cfg.model.path = _abs(str(resolve_model(cfg.model)))  # a hub model id: its folder in the model cache
    check_model_dir(cfg.model.path)
    cfg.adapter_root = _abs(cfg.adapter_root)
    cfg.api_key_file = _abs(cfg.api_key_file)
    load_api_key(cfg.api_key_env, cfg.api_key_file)  # fail now, not as replicas that crash-loop
    dirs = {name: str(resolve_adapter(cfg.adapter_root, name, folder)) for name, folder in cfg.adapters.items()}
    if dirs:
        rank = max_lora_rank(cfg, list(dirs.values()))  # as set, else the smallest vLLM rank that holds every adapter
        for name, path in dirs.items():
            check_rank(name, path, rank)
    cfg.characters_file = _abs(cfg.characters_file)
    characters = load_characters_file(cfg.characters_file) if cfg.characters_file else {}
    cfg.card_registry = _abs(cfg.card_registry)
    cfg.lorebooks = {name: _abs(path) for name, path in cfg.lorebooks.items()}
    cfg.scenes = {name: _abs(path) for name, path in cfg.scenes.items()}
    data = load_catalog(cfg, characters)  # every character, lorebook and scene corpus: read here, sent as data
    options = deployments or {}
    return ChatServer.options(**options.get("ChatServer", {})).bind(cfg.model_dump(), dirs, data)


def deploy_config(
    config: str | Path | dict[str, Any],
    args: dict[str, Any] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    wait: bool = True,
) -> str:
    """Deploy a serve config (a YAML file or its dict) on the connected Ray cluster as ``serve run <config>`` does,
    with keys of its ``args`` replaced by ``args`` and its HTTP host/port by ``host``/``port``; the base URL.

    The config is validated with Ray's ``ServeDeploySchema``, Serve is started with its proxy location and HTTP
    options, and each application runs with its ``deployments:`` options over the defaults. With ``wait=False`` it
    returns once Serve has the applications, while their replicas start (as ``serve deploy`` does), so other work
    can overlap the engine's start-up; :func:`wait_until_running` then waits for them.
    """
    schema = load_serve_config(config, args, host=host, port=port)
    http = schema.http_options
    serve.start(proxy_location=schema.proxy_location, http_options=http.model_dump())
    targets = [
        RunTarget(
            app_for(appl.args, deployment_overrides(appl)),
            name=appl.name,
            route_prefix=appl.route_prefix,
            logging_config=appl.logging_config if "logging_config" in appl.model_fields_set else None,
        )
        for appl in schema.applications
    ]
    serve.run_many(targets, wait_for_applications_running=wait)
    from ray.serve.context import _get_global_client  # no public getter for the running proxy's options

    # Serve keeps the HTTP options it was first started with: ``serve.start`` on a cluster where Serve already runs
    # keeps the running proxy's host and port (it only logs that the new ones are ignored)
    running = _get_global_client().http_config
    host_ = "127.0.0.1" if running.host in ("0.0.0.0", "::", "") else running.host
    prefix = (schema.applications[0].route_prefix or "/").rstrip("/") if schema.applications else ""
    return f"http://{host_}:{running.port}{prefix}"


def wait_until_running(names: list[str], timeout_s: float = 900.0, poll_s: float = 1.0) -> None:
    """Wait until every named Serve application is RUNNING.

    Raises ``RuntimeError`` with Serve's message when one fails to deploy (a bad adapter folder, an engine that
    cannot start), and ``TimeoutError`` naming the applications still starting after ``timeout_s``.
    """
    t0 = time.monotonic()
    while True:
        apps = serve.status().applications
        statuses = {n: apps[n].status.value if n in apps else "NOT_DEPLOYED" for n in names}
        failed = {n: apps[n].message for n, st in statuses.items() if st == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError("; ".join(f"Serve application {n!r} failed to deploy: {m}" for n, m in failed.items()))
        if all(st == "RUNNING" for st in statuses.values()):
            return
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"Serve applications not RUNNING after {timeout_s:.0f} s: {statuses}")
        time.sleep(poll_s)


def run_local(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "rp_ray",
    route_prefix: str = "/",
    wait: bool = True,
) -> str:
    """Deploy the app for ``cfg`` with the default deployment options (what ``serve run`` of a serve config
    without ``deployments:`` overrides, such as serve_configs/tiny_llama3.yaml, deploys); its base URL.
    ``wait=False``: return while the app starts (see :func:`deploy_config`)."""
    return deploy_config(
        {
            "http_options": {"host": host, "port": port},
            "applications": [
                {"name": name, "route_prefix": route_prefix, "import_path": APP_IMPORT_PATH, "args": cfg.model_dump()}
            ],
        },
        wait=wait,
    )
