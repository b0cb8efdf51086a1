"""Load test on loopback: our Serve app vs vLLM's own OpenAI server vs Ray Serve LLM's OpenAI app, same tiny model.

Each server runs in turn in a process of its own (never two at once, so they do not share the 2 cores): start it,
warm it up, then C concurrent clients send N streaming chat requests in total and record per request the latency
and the time to the first visible text (TTFT: the first chunk whose content is not only whitespace; our replies
never start with whitespace, since they are cleaned as LLaMA-Factory cleans them, while vLLM sends it as it comes).
Two loads, each on a server started for it:

- ``mixed``: half the requests to the base model, half to the LoRA adapter, on a server with the adapter loaded
  (vLLM: ``--enable-lora --lora-modules``; ours: an adapter of the serve config);
- ``base``: every request to the base model, on a server without LoRA. Ray Serve LLM runs this load only: its LoRA
  loader takes adapters from cloud storage only (``dynamic_lora_loading_path`` must start with s3://, gs://,
  abfss:// or azure://).

Greedy, fixed max_tokens, prompts from the val split. Each load runs --rounds times; the round with the median
requests/s is reported (single rounds on 2 shared cores vary by 2x). Our app is deployed by run_local (the
deployment options of `serve run serve_configs/tiny_llama3.yaml`); both Ray apps run behind Serve's HAProxy
ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, as ``ray start`` gets it in the README), or behind Serve's Python proxy
with ``--ray-proxy serve``.

Usage: .venv/bin/python bench/serve_load.py [--clients 16] [--requests 200] [--max-tokens 32] [--rounds 3]
       [--servers vllm,rp_ray,ray_serve_llm] [--ray-proxy haproxy|serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = secrets.token_hex(16)
MAX_MODEL_LEN = 1024
SERVERS = ("vllm", "rp_ray", "ray_serve_llm")
LOADS = {"vllm": ("mixed", "base"), "rp_ray": ("mixed", "base"), "ray_serve_llm": ("base",)}
LOAD_MODELS = {"mixed": ("base", "tuned"), "base": ("base",)}


def prompts(n: int) -> list[str]:
    from rp_ray.config import DataConfig
    from rp_ray.data import load_splits

    data = DataConfig(dataset_dir="data", train=[], val=["haruhi_val"], cutoff_len=MAX_MODEL_LEN, use_sample=True)
    _, val, _ = load_splits(data)
    users = [next(m.content for m in reversed(c.messages) if m.role == "user")[:200] for c in val]
    return [users[i % len(users)] for i in range(n)]


async def wait_ready(url: str, model: str, timeout: float = 900) -> None:
    """Until a chat request to ``model`` succeeds (``/v1/models`` may answer before the engine does)."""
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as c:
        while time.monotonic() - t0 < timeout:
            try:
                await one(c, url, model, "hi", 2)
                return
            except (httpx.TransportError, RuntimeError):
                await asyncio.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


async def one(
    c: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int, key: str | None = None
) -> tuple[float, float, int, int]:
    """(latency, time to the first visible text, content chunks, completion tokens) of one streamed request (with
    ``key``, else this bench's own)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    t0 = time.perf_counter()
    ttft, pieces, tokens = None, 0, 0
    headers = {"Authorization": f"Bearer {key or KEY}"}
    async with c.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            tokens = (ev.get("usage") or {}).get("completion_tokens", tokens)
            if any((ch.get("delta", {}).get("content") or "").strip() for ch in ev.get("choices", [])):
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return total, ttft if ttft is not None else total, pieces, tokens


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of the sorted ``xs`` (nearest rank)."""
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def load(url: str, models: tuple[str, ...], texts: list[str], clients: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, t in enumerate(texts):
        queue.put_nowait((models[i % len(models)], t))
    results = []

    async def worker(c):
        while not queue.empty():
            model, text = queue.get_nowait()
            results.append(await one(c, url, model, text, max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        for m in models:  # warm-up: each model once
            await one(c, url, m, texts[0], 4)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "wall_s": round(wall, 2),
        "rps": round(len(results) / wall, 2),
        "p50_s": round(statistics.median(lat), 3),
        "p99_s": round(pct(lat, 0.99), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "chunks_per_reply": round(statistics.mean(r[2] for r in results), 1),
        "tokens_per_reply": round(statistics.mean(r[3] for r in results), 1),
    }


def median_round(url: str, models: tuple[str, ...], a: argparse.Namespace, texts: list[str]) -> dict:
    results = sorted(
        (asyncio.run(load(url, models, texts, a.clients, a.max_tokens)) for _ in range(a.rounds)),
        key=lambda r: r["rps"],
    )
    return {**results[len(results) // 2], "rounds_rps": [r["rps"] for r in results]}


def measure(url: str, load_name: str, a: argparse.Namespace, texts: list[str]) -> dict:
    asyncio.run(wait_ready(url, "base"))
    return median_round(url, LOAD_MODELS[load_name], a, texts)


# -- the servers (each runs in a process of its own: `serve_load.py --one NAME`) ---------------------------------------


def run_vllm(model: Path, adapter: Path | None, load_name: str, a: argparse.Namespace, texts: list[str]) -> dict:
    from rp_ray.cluster import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        "base",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--no-enable-prefix-caching",
        "--api-key",
        KEY,
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
        "--seed",
        "0",
    ]
    if adapter is not None:
        cmd += ["--enable-lora", "--lora-modules", f"tuned={adapter}", "--max-lora-rank", "8"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return measure(f"http://127.0.0.1:{port}", load_name, a, texts)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def start_ray() -> None:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run_ours(model: Path, adapter: Path | None, load_name: str, a: argparse.Namespace, texts: list[str]) -> dict:
    from rp_ray.cluster import free_port
    from rp_ray.config import ServeConfig
    from rp_ray.serve.app import run_local

    key_file = model.parent / "api_key"
    key_file.write_text(KEY)
    cfg = ServeConfig(
        model={"path": str(model), "template": "llama3"},
        adapter_root=str(model.parent / "adapters"),
        adapters={"tuned": adapter.name} if adapter is not None else {},
        max_lora_rank=8,
        max_model_len=MAX_MODEL_LEN,
        api_key_file=str(key_file),
    )
    start_ray()
    try:
        return measure(run_local(cfg, port=free_port()), load_name, a, texts)
    finally:
        stop_ray()


def run_ray_serve_llm(
    model: Path, adapter: Path | None, load_name: str, a: argparse.Namespace, texts: list[str]
) -> dict:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from rp_ray.cluster import free_port

    llm = LLMConfig(
        model_loading_config={"model_id": "base", "model_source": str(model)},
        accelerator_config={"kind": "cpu"},
        engine_kwargs={
            "dtype": "float32",
            "max_model_len": MAX_MODEL_LEN,
            "enable_prefix_caching": False,
            "seed": 0,
        },
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )
    start_ray()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [llm]}), name="llm", route_prefix="/", blocking=False)
        return measure(f"http://127.0.0.1:{port}", load_name, a, texts)
    finally:
        stop_ray()


RUN = {"vllm": run_vllm, "rp_ray": run_ours, "ray_serve_llm": run_ray_serve_llm}


def run_one(server: str, work: Path, a: argparse.Namespace) -> dict:
    """Measure one server in a process of its own (its own Ray cluster, its own environment); its figures or
    the reason it failed."""
    env = {**os.environ, "RP_RAY_BENCH_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    if a.ray_proxy == "haproxy":
        from rp_ray.cluster import LOCAL_SERVE_ENV

        env |= LOCAL_SERVE_ENV  # what ensure_ray gives a private cluster
    out = work / f"{server}.json"
    cmd = [sys.executable, __file__, "--one", server, "--work", str(work), "--out", str(out)]
    cmd += ["--clients", str(a.clients), "--requests", str(a.requests), "--max-tokens", str(a.max_tokens)]
    cmd += ["--rounds", str(a.rounds)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return {**json.loads(out.read_text()), "process_s": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from " + ", ".join(SERVERS))
    ap.add_argument("--ray-proxy", choices=("haproxy", "serve"), default="haproxy")
    ap.add_argument("--one", choices=SERVERS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        global KEY
        KEY = os.environ["RP_RAY_BENCH_KEY"]
        texts = prompts(a.requests)
        adapter = {"mixed": a.work / "adapters" / "tuned", "base": None}
        result = {n: RUN[a.one](a.work / "model", adapter[n], n, a, texts) for n in LOADS[a.one]}
        a.out.write_text(json.dumps(result))
        return

    from rp_ray.llm.models import random_lora_adapter
    from rp_ray.llm.tiny_model import build_tiny_model

    servers = [s for s in a.servers.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model("llama3", work / "model", corpus_file="data/sample/haruhi_train.json")
        random_lora_adapter(model, work / "adapters" / "tuned", target="all-linear")
        results = {s: run_one(s, work, a) for s in servers}
    print(
        f"{a.requests} streaming requests, {a.clients} concurrent clients, max_tokens {a.max_tokens}, greedy, tiny "
        f"llama3 on vllm-cpu, Ray apps behind {a.ray_proxy}; median of {a.rounds} rounds (requests/s)"
    )
    head = f"{'server':14} {'load':6} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'TTFT p50':>9} {'TTFT p99':>9}"
    print(f"{head} {'tokens':>6} rounds")
    for s, r in results.items():
        if "error" in r:
            print(f"{s:14} did not run: {r['error']}")
            continue
        for load_name, f in r.items():
            if load_name == "process_s":
                continue
            print(
                f"{s:14} {load_name:6} {f['rps']:>7} {f['p50_s']:>7} {f['p99_s']:>7} {f['ttft_p50_s']:>9} "
                f"{f['ttft_p99_s']:>9} {f['tokens_per_reply']:>6} {f['rounds_rps']}"
            )
    ours, vllm = results.get("rp_ray", {}), results.get("vllm", {})
    for load_name in ("mixed", "base"):
        if load_name in ours and load_name in vllm:
            o, v = ours[load_name], vllm[load_name]
            print(
                f"rp_ray vs vLLM ({load_name}): req/s {o['rps'] / v['rps']:.2f}x, TTFT p50 "
                f"{1000 * (o['ttft_p50_s'] - v['ttft_p50_s']):+.0f} ms, p99 latency {o['p99_s'] / v['p99_s']:.2f}x"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
