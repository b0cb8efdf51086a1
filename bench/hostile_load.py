"""Hostile load: chat clients on the tiny app, first alone, then beside an attacker sending hostile inputs.

C concurrent clients chat (streamed and not, in turn; greedy, short replies) for a fixed time, once without and once
with an attacker looping over the hostile inputs below; ``/health`` is polled every 0.5 s in both phases. The
attacker's inputs:

- ``redos``: a card whose lorebook keys are regexes that backtracking engines take exponential time on
  (``/^(a+)+$/`` ...), imported, then chatted with (a message of many ``a``); an import refused is the attack;
- ``macro_bomb``: a card named with 64 KiB whose description is 5,000 ``{{char}}``, and one at the limits (a name of
  256 characters, 8,000 ``{{char}}``): imported, chatted with (``{{char}}`` in the message too), ``GET /v1/models``;
- ``png_bomb``: a PNG with 100 zTXt chunks each inflating to 16 MiB (under the card keyword and another one), and
  one whose ``ccv3`` chunk inflates to 64 MiB;
- ``deep_json``: a chat body whose messages are an array nested 5,000 deep;
- ``cross_origin``: a chat request as a browser on another site sends it (``Origin: http://evil.example``,
  ``Content-Type: text/plain``, the key resent as Basic credentials), and the same text/plain body without Origin.

Measured: the clients' p50/p99 latency per phase, every health poll, every attack response (status, time, size),
and the replica's restarts (its Serve replica actors before and after, through Ray's state API). The verdict: no
restart, ``/health`` 200 at every poll, every attack answered with a 4xx or a bounded 2xx within 10 s, no client
request failed, and the clients' p99 with the attacker at most 2x their p99 without.

Usage: .venv/bin/python bench/hostile_load.py [--duration 60] [--clients 16] [--max-tokens 16]
       [--url URL --key KEY [--registry DIR] [--ray-address ADDR]]
Without --url it builds the tiny model and deploys the app on a private local Ray cluster (card registry on).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import one, pct, prompts  # noqa: E402 -- the streamed client and the percentile of the load bench

ATTACK_LIMIT_S = 10.0  # an attack request must be answered within this
MAX_REPLY_BYTES = 4 << 20  # a 2xx answer to an attack larger than this is unbounded (twice the card JSON limit)
HEALTH_EVERY_S = 0.5
P99_FACTOR = 2.0
HTTP_TIMEOUT_S = 60.0  # longer than ATTACK_LIMIT_S: a slow answer is measured, not cut


@dataclass
class Target:
    """A running app: its base URL and key, and (when known) its card registry folder, from which the attacker
    removes the cards it imported."""

    url: str
    key: str
    registry: Path | None = None
    models: tuple[str, ...] = ("base",)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


# -- the hostile inputs ----------------------------------------------------------------------------------------


def v2_card(name: str, **data) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name, **data}}


REDOS_KEYS = ["/^(a+)+$/", "/(a|aa)+$/", "/(a|a?)+$/i", "/(.*a){12}$/", "/^(\\w+\\s?)*$/"]


def redos_card() -> bytes:
    """A card whose lorebook keys are catastrophic for backtracking regex engines (use_regex, V3 style), recursive
    scanning on and entry contents that feed the keys again."""
    entries = [
        {"keys": [k], "content": "a" * 2000 + "!", "use_regex": True, "insertion_order": i, "enabled": True}
        for i, k in enumerate(REDOS_KEYS)
    ]
    book = {"recursive_scanning": True, "scan_depth": 10, "entries": entries}
    return json.dumps(v2_card("Regex Bomb", description="{{char}}", character_book=book)).encode()


REDOS_MESSAGE = "a" * 4096 + "!"


def macro_bomb_cards() -> dict[str, bytes]:
    """The 64 KiB name with 5,000 ``{{char}}``, and a card at the limits (256-character name, 8,000 ``{{char}}``
    in a 64 KiB field: ~2 MB once expanded)."""
    return {
        "huge_name": json.dumps(v2_card("N" * 65536, description="{{char}}" * 5000, first_mes="{{char}}")).encode(),
        "at_limits": json.dumps(
            v2_card("M" * 256, description="{{char}}" * 8000, first_mes="<BOT>" * 100, personality="{{user}}")
        ).encode(),
    }


MACRO_MESSAGE = "{{char}}" * 5000  # then "hi {{char}}": the card's own ~2 MB of expanded macros alone


def png_chunk(type_: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + type_ + data + zlib.crc32(data, zlib.crc32(type_)).to_bytes(4, "big")


def png_with(chunks: list[bytes]) -> bytes:
    """A 1x1 grey PNG with ``chunks`` before its IEND."""
    ihdr = png_chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
    idat = png_chunk(b"IDAT", zlib.compress(b"\0\x80"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + b"".join(chunks) + png_chunk(b"IEND", b"")


def png_bombs() -> dict[str, bytes]:
    """100 zTXt chunks inflating to 16 MiB each (under ``Comment`` and under ``chara``), and a ``ccv3`` zTXt
    inflating to 64 MiB beside a compressed iTXt ``ccv3`` of 16 MiB."""
    mib16 = zlib.compress(b"A" * (16 << 20), 9)
    mib64 = zlib.compress(b"A" * (64 << 20), 9)
    ztxt = [png_chunk(b"zTXt", (b"Comment" if i % 2 else b"chara") + b"\0\0" + mib16) for i in range(100)]
    itxt = png_chunk(b"iTXt", b"ccv3\0\1\0\0\0" + mib16)
    return {
        "ztxt_x100": png_with(ztxt),
        "ccv3": png_with([png_chunk(b"zTXt", b"ccv3\0\0" + mib64), itxt]),
    }


def deep_json(depth: int = 5000) -> bytes:
    return b'{"model": "base", "max_tokens": 16, "messages": ' + b"[" * depth + b"]" * depth + b"}"


ATTACKS = ("redos", "macro_bomb", "png_bomb", "deep_json", "cross_origin")


@dataclass
class Call:
    """One request of the attacker: which attack and step, the answer's status (None: no answer), time and size."""

    attack: str
    step: str
    status: int | None
    seconds: float
    size: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.status is None or self.seconds > ATTACK_LIMIT_S:
            return False
        return 400 <= self.status < 500 or (200 <= self.status < 300 and self.size <= MAX_REPLY_BYTES)


class Attacker:
    """The hostile inputs (built once) and the requests that send them."""

    def __init__(self, target: Target):
        self.t = target
        self.n = 0
        self.redos = redos_card()
        self.macros = macro_bomb_cards()
        self.pngs = png_bombs()
        self.deep = deep_json()
        self.attacks: dict[str, Callable[[httpx.AsyncClient], Awaitable[list[Call]]]] = {
            name: getattr(self, f"{name}_attack") for name in ATTACKS
        }

    async def send(self, c: httpx.AsyncClient, attack: str, step: str, method: str, path: str, **kw) -> Call:
        t0 = time.perf_counter()
        try:
            r = await c.request(method, f"{self.t.url}{path}", timeout=HTTP_TIMEOUT_S, **kw)
            return Call(attack, step, r.status_code, time.perf_counter() - t0, len(r.content))
        except httpx.HTTPError as e:
            return Call(attack, step, None, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])

    def chat_body(self, model: str, text: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0}

    async def import_then(
        self, c: httpx.AsyncClient, attack: str, step: str, raw: bytes, messages: tuple[str, ...]
    ) -> list[Call]:
        """Import ``raw`` as a card; when it is taken, chat with it (each of ``messages``) and list the models, then
        remove it."""
        self.n += 1
        name = f"hostile-{attack.replace('_', '-')}-{os.getpid()}-{self.n}"
        headers = {**self.t.auth, "Content-Type": "application/octet-stream"}
        calls = [
            await self.send(
                c,
                attack,
                f"{step}:import",
                "POST",
                "/v1/characters",
                content=raw,
                headers=headers,
                params={"name": name},
            )
        ]
        if calls[0].status == 201:
            try:
                for k, message in enumerate(messages):
                    body = self.chat_body(name, message)
                    path = "/v1/chat/completions"
                    calls.append(
                        await self.send(c, attack, f"{step}:chat{k}", "POST", path, json=body, headers=self.t.auth)
                    )
                calls.append(await self.send(c, attack, f"{step}:models", "GET", "/v1/models", headers=self.t.auth))
            finally:
                if self.t.registry is not None:
                    for f in self.t.registry.glob(f"{name}.*"):
                        f.unlink(missing_ok=True)
        return calls

    async def redos_attack(self, c: httpx.AsyncClient) -> list[Call]:
        return await self.import_then(c, "redos", "card", self.redos, (REDOS_MESSAGE,))

    async def macro_bomb_attack(self, c: httpx.AsyncClient) -> list[Call]:
        calls = []
        for step, raw in self.macros.items():
            calls += await self.import_then(c, "macro_bomb", step, raw, (MACRO_MESSAGE, "hi {{char}}"))
        return calls

    async def png_bomb_attack(self, c: httpx.AsyncClient) -> list[Call]:
        calls = []
        for step, raw in self.pngs.items():
            calls += await self.import_then(c, "png_bomb", step, raw, ("hi",))
        return calls

    async def deep_json_attack(self, c: httpx.AsyncClient) -> list[Call]:
        headers = {**self.t.auth, "Content-Type": "application/json"}
        return [
            await self.send(c, "deep_json", "chat", "POST", "/v1/chat/completions", content=self.deep, headers=headers)
        ]

    async def cross_origin_attack(self, c: httpx.AsyncClient) -> list[Call]:
        body = json.dumps(self.chat_body(self.t.models[0], "hi")).encode()
        basic = "Basic " + base64.b64encode(f"user:{self.t.key}".encode()).decode()  # what a browser resends
        form = {"Authorization": basic, "Content-Type": "text/plain"}
        evil = {**form, "Origin": "http://evil.example"}
        return [
            await self.send(
                c, "cross_origin", "evil_origin", "POST", "/v1/chat/completions", content=body, headers=evil
            ),
            await self.send(
                c, "cross_origin", "text_plain", "POST", "/v1/chat/completions", content=body, headers=form
            ),
        ]

    async def loop(self, stop: asyncio.Event) -> list[Call]:
        """Every attack in turn until ``stop`` is set, and each at least once."""
        calls: list[Call] = []
        rounds = 0
        async with httpx.AsyncClient() as c:
            while not rounds or not stop.is_set():
                for attack in self.attacks.values():
                    calls += await attack(c)
                    if rounds and stop.is_set():
                        break
                rounds += 1
        return calls


# -- the clients and the measurements --------------------------------------------------------------------------


@dataclass
class Request:
    seconds: float
    status: int | None  # None: no answer (a transport error)
    streamed: bool


async def chat_client(
    c: httpx.AsyncClient, t: Target, i: int, texts: list[str], stop: asyncio.Event, max_tokens: int
) -> list[Request]:
    """One client: chat requests back to back until ``stop``, streamed and not in turn."""
    out, k = [], i
    while not stop.is_set():
        model, text = t.models[k % len(t.models)], texts[k % len(texts)]
        streamed = k % 2 == 0
        t0 = time.perf_counter()
        try:
            if streamed:
                await one(c, t.url, model, text, max_tokens, t.key)
                status = 200
            else:
                body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
                r = await c.post(f"{t.url}/v1/chat/completions", json=body | {"temperature": 0}, headers=t.auth)
                status = r.status_code
        except RuntimeError as e:  # one(): a non-200 answer
            status = int(str(e).split("HTTP ", 1)[1].split(":", 1)[0]) if "HTTP " in str(e) else None
        except httpx.HTTPError:
            status = None
        out.append(Request(time.perf_counter() - t0, status, streamed))
        k += 1
    return out


async def poll_health(url: str, stop: asyncio.Event) -> list[tuple[int | None, float]]:
    """(status, seconds) of ``GET /health`` every ``HEALTH_EVERY_S`` until ``stop``."""
    polls = []
    async with httpx.AsyncClient() as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status = (await c.get(f"{url}/health", timeout=ATTACK_LIMIT_S)).status_code
            except httpx.HTTPError:
                status = None
            took = time.perf_counter() - t0
            polls.append((status, took))
            await asyncio.sleep(max(0.0, HEALTH_EVERY_S - took))
    return polls


@dataclass
class Phase:
    name: str
    seconds: float
    requests: list[Request]
    health: list[tuple[int | None, float]]
    attacks: list[Call] = field(default_factory=list)

    @property
    def latencies(self) -> list[float]:
        return sorted(r.seconds for r in self.requests if r.status == 200)

    def p(self, q: float) -> float:
        lat = self.latencies
        return pct(lat, q) if lat else float("nan")

    @property
    def failed(self) -> list[Request]:
        return [r for r in self.requests if r.status != 200]


async def run_phase(
    t: Target, name: str, seconds: float, clients: int, max_tokens: int, attack: bool, texts: list[str]
) -> Phase:
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S * 2, limits=limits) as c:
        health = asyncio.create_task(poll_health(t.url, stop))
        attacker = asyncio.create_task(Attacker(t).loop(stop)) if attack else None
        workers = [asyncio.create_task(chat_client(c, t, i, texts, stop, max_tokens)) for i in range(clients)]
        await asyncio.sleep(seconds)
        stop.set()
        requests = [r for rs in await asyncio.gather(*workers) for r in rs]
        calls = await attacker if attacker else []
        return Phase(name, seconds, requests, await health, calls)


# -- replica restarts ------------------------------------------------------------------------------------------


def replica_actors() -> dict[str, tuple[str, int | None, int]] | None:
    """The Serve replica actors of the app (alive and dead): actor id -> (state, pid, restarts), from Ray's state API;
    None when this process is not connected to the app's Ray cluster (or its state API does not answer)."""
    try:
        import ray
        from ray.util.state import list_actors

        if not ray.is_initialized():
            return None
        found = list_actors(filters=[("class_name", "=", "ServeReplica:rp_ray:ChatServer")], limit=10_000, detail=True)
        if not found:  # another app name or route: any ChatServer replica
            found = [a for a in list_actors(limit=10_000, detail=True) if "ChatServer" in (a.class_name or "")]
    except Exception:  # noqa: BLE001 -- no dashboard, no cluster: restarts are then not measured
        return None
    return {a.actor_id: (a.state, a.pid, a.num_restarts or 0) for a in found}


def count_restarts(before: dict | None, after: dict | None) -> int | None:
    """Replicas started or restarted between two ``replica_actors`` snapshots: new actors (Serve replaced one), Ray
    restarts of an actor, and a changed PID; None when either snapshot is missing."""
    if before is None or after is None:
        return None
    n = len(set(after) - set(before))
    for actor, (_state, pid, restarts) in after.items():
        if actor in before:
            _, pid0, restarts0 = before[actor]
            n += max(0, restarts - restarts0) + (pid0 is not None and pid is not None and pid != pid0)
    return n


# -- the whole run ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    baseline: Phase
    attacked: Phase
    restarts: int | None
    replicas: int | None

    def verdict(self, p99_factor: float = P99_FACTOR) -> list[str]:
        """What failed (empty: the app held)."""
        fails = []
        if self.restarts is None:
            fails.append("replica restarts not measured (no connection to the app's Ray cluster)")
        elif self.restarts:
            fails.append(f"{self.restarts} replica restart(s)")
        polls = self.baseline.health + self.attacked.health
        bad = [p for p in polls if p[0] != 200]
        if bad or not polls:
            fails.append(f"/health not 200 at {len(bad)} of {len(polls)} polls: {bad[:5]}")
        wrong = [c for c in self.attacked.attacks if not c.ok]
        if wrong:
            fails.append(
                f"{len(wrong)} attack answer(s) not a 4xx / bounded 2xx within {ATTACK_LIMIT_S:.0f} s: {wrong[:4]}"
            )
        if not self.attacked.attacks:
            fails.append("the attacker sent nothing")
        for ph in (self.baseline, self.attacked):
            if ph.failed or not ph.latencies:
                statuses = sorted({r.status for r in ph.failed}, key=str)
                fails.append(f"{ph.name}: {len(ph.failed)} of {len(ph.requests)} client requests failed ({statuses})")
        p0, p1 = self.baseline.p(0.99), self.attacked.p(0.99)
        if not p1 <= p99_factor * p0:
            fails.append(f"client p99 {p1:.2f} s with the attacker > {p99_factor:g}x {p0:.2f} s without")
        return fails

    def table(self) -> str:
        lines = [
            f"{'phase':10} {'requests':>8} {'failed':>6} {'p50 s':>7} {'p99 s':>7} {'health polls':>12} "
            f"{'not 200':>7} {'max poll s':>10}"
        ]
        for ph in (self.baseline, self.attacked):
            worst = max((s for _, s in ph.health), default=float("nan"))
            lines.append(
                f"{ph.name:10} {len(ph.requests):>8} {len(ph.failed):>6} {ph.p(0.5):>7.3f} {ph.p(0.99):>7.3f} "
                f"{len(ph.health):>12} {sum(p[0] != 200 for p in ph.health):>7} {worst:>10.3f}"
            )
        lines.append("")
        lines.append(f"{'attack':13} {'step':22} {'sent':>4} {'statuses':24} {'max s':>6} {'max bytes':>9} ok")
        groups: dict[tuple[str, str], list[Call]] = {}
        for c in self.attacked.attacks:
            groups.setdefault((c.attack, c.step), []).append(c)
        for (attack, step), calls in groups.items():
            statuses = ",".join(sorted({str(c.status) for c in calls}))
            lines.append(
                f"{attack:13} {step:22} {len(calls):>4} {statuses:24} {max(c.seconds for c in calls):>6.2f} "
                f"{max(c.size for c in calls):>9} {'yes' if all(c.ok for c in calls) else 'NO'}"
            )
        lines.append("")
        lines.append(
            f"replica restarts: {self.restarts if self.restarts is not None else 'not measured'} "
            f"(replica actors seen: {self.replicas})"
        )
        return "\n".join(lines)


def run(t: Target, seconds: float, clients: int, max_tokens: int = 16) -> Report:
    """Both phases against ``t`` (warm-up first), the replicas counted before and after."""
    texts = prompts(64)
    asyncio.run(_warm(t))
    before = replica_actors()
    baseline = asyncio.run(run_phase(t, "baseline", seconds, clients, max_tokens, False, texts))
    attacked = asyncio.run(run_phase(t, "attacked", seconds, clients, max_tokens, True, texts))
    after = replica_actors()
    return Report(baseline, attacked, count_restarts(before, after), None if after is None else len(after))


async def _warm(t: Target) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S * 5) as c:
        for m in t.models:
            await one(c, t.url, m, "hi", 4, t.key)


def deploy_tiny(work: Path) -> Target:
    """The tiny llama3 model built and served on a private local Ray cluster (its state API on, for the replica
    count), with a card registry for the attacker's imports."""
    import secrets

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rph", dir="/tmp")  # never joins another cluster here
    import ray

    from rp_ray.cluster import LOCAL_SERVE_ENV, free_port, haproxy_env
    from rp_ray.config import ServeConfig
    from rp_ray.llm.tiny_model import build_tiny_model
    from rp_ray.serve.app import run_local

    model = build_tiny_model("llama3", work / "model", corpus_file="data/sample/haruhi_train.json")
    key = secrets.token_hex(16)
    (work / "api_key").write_text(key)
    (work / "cards").mkdir()
    cfg = ServeConfig(
        model={"path": str(model), "template": "llama3"},
        max_model_len=1024,
        api_key_file=str(work / "api_key"),
        card_registry=str(work / "cards"),
    )
    os.environ.update(LOCAL_SERVE_ENV | haproxy_env(Path(os.environ["RAY_TMPDIR"]) / "haproxy"))
    ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="WARNING", log_to_driver=False)
    return Target(run_local(cfg, port=free_port()), key, work / "cards")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60, help="seconds of each phase")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--url", help="a running app (else the tiny app is deployed here)")
    ap.add_argument("--key", default=os.environ.get("RP_RAY_API_KEY"), help="its API key (default: $RP_RAY_API_KEY)")
    ap.add_argument("--registry", type=Path, help="its card registry folder: imported attack cards are removed")
    ap.add_argument("--ray-address", help="its Ray cluster, to count replica restarts")
    ap.add_argument("--models", default="base", help="comma-separated models the clients chat with")
    a = ap.parse_args()
    models = tuple(m for m in a.models.split(",") if m)
    with tempfile.TemporaryDirectory() as tmp:
        if a.url:
            if not a.key:
                ap.error("--url needs --key (or RP_RAY_API_KEY)")
            if a.ray_address:
                import ray

                ray.init(address=a.ray_address, logging_level="WARNING", log_to_driver=False)
            target = Target(a.url.rstrip("/"), a.key, a.registry, models)
        else:
            target = deploy_tiny(Path(tmp))
            target.models = models
        try:
            report = run(target, a.duration, a.clients, a.max_tokens)
        finally:
            if not a.url:
                import ray
                from ray import serve

                serve.shutdown()
                ray.shutdown()
    print(f"{a.clients} clients, {a.duration:g} s per phase, max_tokens {a.max_tokens}, models {','.join(models)}")
    print(report.table())
    fails = report.verdict()
    print("verdict: " + ("PASS" if not fails else "FAIL\n  " + "\n  ".join(fails)))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
