"""Serving against hostile cards, chats and callers: macro expansion stays bounded, a slow prompt does not stall the
replica, other sites' pages cannot post to the API, and the card registry survives stale cards, racing imports and
floods. Ray-free: the catalog, cards and prompts directly, the HTTP routes on the app in-process (no engine)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from rp_ray.character.card import MAX_NAME_CHARS, CardError, CardRegistry, card_from_dict, dump_json, parse_card
from rp_ray.character.catalog import Catalog, ImportRefused, load_catalog
from rp_ray.character.lorebook import activate
from rp_ray.character.prompt import apply_macros, macro_growth
from rp_ray.config import ConfigError, ServeConfig
from rp_ray.data import Message
from rp_ray.serve.auth import origin_key
from rp_ray.serve.protocol import Delta

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def v2(name: str = "Mallory", **data) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name, **data}}


def raw(card: dict) -> bytes:
    return json.dumps(card).encode()


def serve_cfg(tmp_path: Path, model: str = "unused", **kw) -> ServeConfig:
    (tmp_path / "reg").mkdir(parents=True, exist_ok=True)
    return ServeConfig(model={"path": model, "template": "llama3"}, card_registry=str(tmp_path / "reg"), **kw)


# -- macros ---------------------------------------------------------------------------------------------------


def test_a_cards_name_is_at_most_256_characters(tmp_path):
    card_from_dict(v2("n" * MAX_NAME_CHARS), "ok.json")
    with pytest.raises(CardError, match=r"big.json: field data.name: the name is 257 characters, over the limit of"):
        card_from_dict(v2("n" * 257), "big.json")
    catalog = Catalog(serve_cfg(tmp_path))
    with pytest.raises(ImportRefused, match="field data.name") as e:
        catalog.import_card(raw(v2("n" * 65536, first_mes="{{char}}" * 5000)), name="big")
    assert (e.value.status, e.value.code) == (400, "invalid_card")
    assert not list((tmp_path / "reg").iterdir())


def test_macros_expand_in_one_pass_and_their_growth_is_counted_exactly():
    texts = ["{{char}} and <BOT> meet {{USER}} and <user>.", "", "no macros", "{{Char}}{{char}}"]
    for name in ("Mallory", "{{user}}", "n" * 256):
        assert sum(len(apply_macros(t, name, "Kyon")) - len(t) for t in texts) == macro_growth(texts, name, "Kyon")
    assert apply_macros("{{char}}", "{{user}}<user>", "Kyon") == "{{user}}<user>"  # a name is not expanded again


def test_a_card_whose_macros_would_add_more_than_the_card_json_limit_is_refused(tmp_path, caplog):
    """Each greeting alone is within the 64 KiB field limit; their {{char}} times a 256-character name is not."""
    flood = "{{char}}" * 8000
    card = v2("n" * 256, first_mes=flood, alternate_greetings=[flood, flood])
    catalog = Catalog(serve_cfg(tmp_path))
    with pytest.raises(ImportRefused, match=r"expanding its macros .* over the limit of 2 MiB") as e:
        catalog.import_card(raw(card), name="flood")
    assert e.value.status == 400 and "shorten the name" in str(e.value)
    catalog.import_card(raw(v2("n" * 256, first_mes="{{char}}" * 100)), name="fine")
    # written by hand into the registry: not served, where the config is read nor on a rescan
    (tmp_path / "reg" / "hand.json").write_text(dump_json(card))
    with caplog.at_level(logging.WARNING):
        data = load_catalog(catalog.cfg, {})
        assert set(data["cards"]) == {"fine"}
        assert [c.name for c in catalog.all()] == ["fine"]
    assert "hand.json" in caplog.text and "expanding its macros" in caplog.text


def test_a_chats_macros_may_not_expand_past_the_body_limit(tmp_path):
    """5,000 <BOT> in a user message (30 KB) would be 1.3 MB of prompt with a 256-character name: a 400, before any
    lorebook is scanned or any text expanded."""
    catalog = Catalog(serve_cfg(tmp_path))
    character = catalog.import_card(raw(v2("n" * 256, description="{{char}} is here.")), name="long")
    count = lambda text: len(text)  # noqa: E731
    with pytest.raises(ValueError, match=r"would be 1280\d+ characters, over the limit of 1048576 \(max_body_bytes\)"):
        character.prompt([Message("user", "<BOT>" * 5000)], count, max_chars=1 << 20)
    prompt = character.prompt([Message("user", "<BOT>" * 100)], count, max_chars=1 << 20)
    assert prompt.turns[0].content == "n" * 25600


def test_greetings_are_expanded_once_per_card_not_per_model_list(tmp_path, monkeypatch):
    import rp_ray.character.catalog as catalog_module

    catalog = Catalog(serve_cfg(tmp_path))
    catalog.import_card(raw(v2("Mallory", first_mes="Hi {{user}}", alternate_greetings=["Yo {{user}}"])), name="m")
    calls = []
    real = catalog_module.apply_macros
    monkeypatch.setattr(catalog_module, "apply_macros", lambda *a: calls.append(a) or real(*a))
    first = [c.entry() for c in catalog.all()]
    expanded = len(calls)
    for _ in range(5):
        assert [c.entry() for c in catalog.all()] == first
    assert len(calls) == expanded <= 2
    assert first[0]["greeting"] == "Hi User" and first[0]["alternate_greetings"] == ["Yo User"]


# -- prompt deadline ---------------------------------------------------------------------------------------------


def test_a_lorebook_scan_stops_at_its_deadline():
    book = parse_card((FIXTURES / "v3_lorebook.json").read_bytes(), "aoi").book
    texts = ["Meet me at the tavern, then we go to the Ark."]
    assert activate(book, texts, len, deadline=time.monotonic() + 60)
    with pytest.raises(TimeoutError, match="deadline"):
        activate(book, texts, len, deadline=time.monotonic() - 1)


class FakeEngine:
    """What the routes call on the engine: one short reply per request."""

    max_lora_rank = None

    async def generate(self, prompt, sampling, adapter, cid):
        yield Delta(0, "Hello.", 2, "stop")

    def cancel(self, cid: str) -> None:
        pass

    async def check_health(self) -> None:
        pass


class FakeMetrics:
    requests = SimpleNamespace(inc=lambda **_: None)

    @staticmethod
    def observe(gen, *_):
        return gen


@pytest.fixture
def server(tiny_llama3, llama3_tok, tmp_path, monkeypatch):
    """The app's routes in this process: a ChatServer made without its engine (``FakeEngine``), the tiny model's
    tokenizer, a card registry, a 0.5 s prompt budget; requests go through the ASGI app (``call``)."""
    import ray.serve

    from rp_ray.serve import app as app_module
    from rp_ray.serve.adapters import AdapterRegistry
    from rp_ray.serve.chat import ChatServing, parse_request

    cfg = serve_cfg(tmp_path, str(tiny_llama3), adapter_root=str(tmp_path), prompt_timeout_s=0.5, max_model_len=1024)
    # the class under Serve's ingress wrapper, made without its __init__ (which starts an engine)
    srv = object.__new__(app_module.ChatServer.func_or_class.__bases__[0])
    srv.cfg, srv.configured = cfg, set()
    srv.serving = ChatServing(cfg, load_catalog(cfg, {}), tok=llama3_tok)
    srv.engine, srv.registry = FakeEngine(), AdapterRegistry(tmp_path)
    srv.serving.prepare(parse_request(CHAT))  # imports vLLM's sampling types, which takes longer than the budget
    # the class Serve keeps is a copy whose methods see their own copy of the FastAPI app: both get the state
    for api in {id(a): a for a in (app_module.api, type(srv)._complete.__globals__["api"])}.values():
        monkeypatch.setattr(api.state, "api_key", KEY, raising=False)
        monkeypatch.setattr(api.state, "metrics", FakeMetrics(), raising=False)
    # Serve's class-based routes take the replica's object from its context
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=srv))
    srv.client = lambda: httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_module.api), base_url="http://testserver"
    )
    return srv


def call(srv, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with srv.client() as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def test_a_slow_prompt_does_not_stall_the_replica_and_gets_a_504(server, monkeypatch):
    """A prompt that takes 1.5 s to build (a huge lorebook, say) runs beside the event loop: the model list asked
    meanwhile comes back at once, and the chat gets the prompt_timeout 504 at its 0.5 s budget."""
    real = server.serving.prepare

    def slow(req, *deadline):
        time.sleep(1.5)
        return real(req, *deadline)

    monkeypatch.setattr(server.serving, "prepare", slow)

    async def go():
        async with server.client() as c:
            t0 = time.monotonic()
            chat = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=AUTH))
            await asyncio.sleep(0.05)
            models = await c.get("/v1/models", headers=AUTH)
            models_s = time.monotonic() - t0
            reply = await chat
            return models, models_s, reply, time.monotonic() - t0

    models, models_s, reply, reply_s = asyncio.run(go())
    assert models.status_code == 200 and models_s < 1.0, models_s
    assert reply.status_code == 504 and reply_s < 1.4, (reply.text, reply_s)
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("timeout", "prompt_timeout")
    assert "prompt_timeout_s=0.5" in error["message"]
    # the thread's late result is dropped; a prompt in budget is answered as before
    monkeypatch.setattr(server.serving, "prepare", real)
    ok = call(server, "POST", "/v1/chat/completions", json=CHAT, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello."


def test_a_prompt_builder_past_its_deadline_stops_instead_of_finishing(server):
    """The worker thread cannot be killed: the builder itself gives up (here before tokenizing a lorebook card)."""
    from rp_ray.serve.chat import parse_request

    server.serving.import_card((FIXTURES / "v3_lorebook.json").read_bytes(), name="aoi")
    req = parse_request({"model": "aoi", "messages": [{"role": "user", "content": "The tavern?"}]})
    assert server.serving.prepare(req, time.monotonic() + 60).prompt
    with pytest.raises(TimeoutError):
        server.serving.prepare(req, time.monotonic() - 1)


# -- cross-site requests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize", "/v1/unload_lora_adapter"])
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_json_routes_take_only_the_json_content_type(server, path, kind):
    headers = AUTH if kind is None else {**AUTH, "Content-Type": kind}
    r = call(server, "POST", path, content=json.dumps(CHAT), headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_media_type" and "Content-Type application/json" in error["message"]


def test_json_with_a_charset_is_json(server):
    headers = {**AUTH, "Content-Type": "Application/JSON; charset=utf-8"}
    assert call(server, "POST", "/v1/chat/completions", content=json.dumps(CHAT), headers=headers).status_code == 200


def test_a_card_import_takes_the_files_bytes_only_with_a_type_no_form_sends(server, tmp_path):
    card = (FIXTURES / "v2_card.json").read_bytes()
    for kind in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"):
        r = call(server, "POST", "/v1/characters", content=card, headers={**AUTH, "Content-Type": kind})
        assert r.status_code == 415 and "application/octet-stream" in r.json()["error"]["message"], r.text
    assert not list((tmp_path / "reg").iterdir())
    for i, kind in enumerate(("application/octet-stream", "application/json")):
        headers = {**AUTH, "Content-Type": kind}
        r = call(server, "POST", "/v1/characters", content=card, headers=headers, params={"name": f"c{i}"})
        assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "origin, headers, allowed",
    [
        (None, {}, True),  # the openai package, SillyTavern's server, curl
        ("http://testserver", {}, True),  # the chat page
        ("http://testserver:80", {}, True),
        ("https://testserver", {"X-Forwarded-Proto": "https"}, True),  # behind a TLS proxy
        ("https://chat.example", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example"}, True),
        ("https://evil.example", {}, False),
        ("http://testserver:8080", {}, False),
        ("https://testserver", {}, False),
        ("null", {}, False),  # a sandboxed frame or a file: page
    ],
)
def test_writes_from_another_sites_page_are_refused(server, origin, headers, allowed):
    headers = {**AUTH, **headers, **({"Origin": origin} if origin else {})}
    chat = call(server, "POST", "/v1/chat/completions", json=CHAT, headers=headers)
    card = call(
        server,
        "POST",
        "/v1/characters",
        content=(FIXTURES / "v2_card.json").read_bytes(),
        headers={**headers, "Content-Type": "application/octet-stream"},
        params={"name": "cross"},
    )
    if allowed:
        assert (chat.status_code, card.status_code) == (200, 201), (chat.text, card.text)
    else:
        for r in (chat, card):
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "cross_origin_request" and repr(origin) in r.json()["error"]["message"]
    # reads are not refused: without CORS headers the other site's page cannot read the answer anyway
    assert call(server, "GET", "/v1/models", headers=headers).status_code == 200


def test_origins_compare_by_scheme_host_and_port():
    assert origin_key("http://Host") == origin_key("http://host:80") == ("http", "host", 80)
    assert origin_key("https://[::1]:8443") == ("https", "::1", 8443)
    assert origin_key("null") is origin_key("file://") is origin_key("http://h:port") is None


def test_the_chat_page_sends_what_the_routes_require():
    from importlib import resources

    page = resources.files("rp_ray.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    assert '"Content-Type": "application/octet-stream"' in page and '"Content-Type": "application/json"' in page


# -- the card registry -------------------------------------------------------------------------------------------


def test_stale_cards_are_skipped_where_the_config_is_read(tmp_path, caplog):
    """A card whose adapter is gone, one whose name is now an adapter's and a broken file are each logged and left
    out (with the lorebook and scenes configured for them); the good card is served."""
    reg = CardRegistry(tmp_path / "reg")
    reg.import_file(FIXTURES / "v2_card.json", name="good")
    reg.import_file(FIXTURES / "v2_card.json", name="stale", adapter="gone")
    reg.import_file(FIXTURES / "v2_card.json", name="a1")
    (tmp_path / "reg" / "broken.json").write_text('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {}}')
    book = {"stale": str(FIXTURES / "world_info.json")}
    cfg = serve_cfg(tmp_path, adapters={"a1": "a1"}, lorebooks=book, scenes={"broken": str(tmp_path / "x.jsonl")})
    with caplog.at_level(logging.WARNING):
        data = load_catalog(cfg, {})
    assert set(data["cards"]) == {"good"} and data["lorebooks"] == {} and data["scenes"] == {}
    for file, reason in [
        ("stale.json", "'gone' is not a served adapter"),
        ("a1.json", "is taken by a served adapter"),
        ("broken.json", "field data.name: missing"),
    ]:
        assert any(file in r.message and reason in r.message for r in caplog.records), (file, caplog.text)
    assert "lorebooks.stale" in caplog.text and "scenes.broken" in caplog.text
    assert [c.name for c in Catalog(cfg, data).all()] == ["good"]  # and a replica's rescan agrees
    with pytest.raises(ConfigError, match="lorebooks.nobody: no imported card"):  # a config mistake still fails
        load_catalog(cfg.model_copy(update={"lorebooks": {"nobody": str(FIXTURES / "world_info.json")}}), {})


def test_an_import_losing_the_race_for_a_name_leaves_the_winners_image(tmp_path, monkeypatch):
    """B's card (JSON and image) lands between A's check that the name is free and A's writes: A is refused and the
    registry keeps B's card beside B's own image."""
    reg = CardRegistry(tmp_path / "reg")
    (tmp_path / "reg").mkdir()
    target, image = reg.path("x"), tmp_path / "reg" / "x.png"
    target.write_text(dump_json(v2("B")))
    image.write_bytes(b"B's image")
    real_exists, seen = Path.exists, []

    def exists(self, *a, **kw):  # the name looks free once, as it did before B wrote it
        if self == target and not seen:
            seen.append(self)
            return False
        return real_exists(self, *a, **kw)

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.raises(CardError, match="already in"):
        reg.add(card_from_dict(v2("A"), "a.json"), "x", image=b"A's image")
    assert seen and json.loads(target.read_text())["data"]["name"] == "B" and image.read_bytes() == b"B's image"


def test_imports_stop_at_the_registry_quotas(tmp_path):
    catalog = Catalog(serve_cfg(tmp_path, max_registry_cards=2))
    card = (FIXTURES / "v2_card.json").read_bytes()
    catalog.import_card(card, name="one")
    catalog.import_card(card, name="two")
    with pytest.raises(ImportRefused, match=r"holds 2 cards, its limit \(max_registry_cards=2\)") as e:
        catalog.import_card(card, name="three")
    assert (e.value.status, e.value.code) == (409, "card_registry_full")
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["one.json", "two.json"]

    catalog = Catalog(serve_cfg(tmp_path / "b", max_registry_bytes=1 << 20))
    (tmp_path / "b" / "reg" / "notes.bin").write_bytes(b"x" * ((1 << 20) - 10))  # every file in the folder counts
    with pytest.raises(ImportRefused, match=r"over its limit \(max_registry_bytes=1048576\)") as e:
        catalog.import_card(card, name="one")
    assert e.value.status == 409 and not (tmp_path / "b" / "reg" / "one.json").exists()
    assert ServeConfig.model_fields["max_registry_cards"].default == 1000
    assert ServeConfig.model_fields["max_registry_bytes"].default == 1 << 30
