"""Load test on loopback: our Serve app vs vLLM's own OpenAI server, same tiny model, same adapter, same load.

Each server in turn (never both at once, so they do not share the 2 cores): start it, warm it up, then C concurrent
clients send N streaming chat requests in total (half to the base model, half to the LoRA adapter; greedy, fixed
max_tokens, prompts from the val split), and record per request the latency and the time to the first content
token. The load runs --rounds times on the same warm server; the round with the median requests/s is reported
(single rounds on 2 shared cores vary by 2x). Prints requests/s, p50/p99 latency, p50/p99 TTFT for both, and
ours/vLLM ratios. Our app is deployed by run_local: the deployment options of `serve run serve_configs/tiny_llama3.yaml`
(the defaults in rp_ray/serve/deployments.py).

Usage: .venv/bin/python bench/serve_load.py [--clients 16] [--requests 200] [--max-tokens 32] [--rounds 3]
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

from rp_ray.cluster import free_port
from rp_ray.config import DataConfig, ServeConfig
from rp_ray.data import load_splits
from rp_ray.models import random_lora_adapter
from rp_ray.serve.app import run_local
from rp_ray.tiny_model import build_tiny_model

KEY = secrets.token_hex(16)
MAX_MODEL_LEN = 1024


def prompts(n: int) -> list[str]:
    data = DataConfig(dataset_dir="data", train=[], val=["haruhi_val"], cutoff_len=MAX_MODEL_LEN)
    _, val, _ = load_splits(data)
    users = [next(m.content for m in reversed(c.messages) if m.role == "user")[:200] for c in val]
    return [users[i % len(users)] for i in range(n)]


async def wait_ready(url: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    async with httpx.AsyncClient() as c:
        while time.monotonic() - t0 < timeout:
            try:
                r = await c.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


async def one(c: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    t0 = time.perf_counter()
    ttft, pieces = None, 0
    headers = {"Authorization": f"Bearer {KEY}"}
    async with c.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if any(ch.get("delta", {}).get("content") for ch in ev.get("choices", [])):
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return total, ttft if ttft is not None else total, pieces


def median_round(
    url: str, models: tuple[str, str], texts: list[str], clients: int, max_tokens: int, rounds: int
) -> dict:
    results = sorted(
        (asyncio.run(load(url, models, texts, clients, max_tokens)) for _ in range(rounds)), key=lambda r: r["rps"]
    )
    return {**results[len(results) // 2], "rounds_rps": [r["rps"] for r in results]}


async def load(url: str, models: tuple[str, str], texts: list[str], clients: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, t in enumerate(texts):
        queue.put_nowait((models[i % 2], t))
    results = []

    async def worker(c):
        while not queue.empty():
            model, text = queue.get_nowait()
            results.append(await one(c, url, model, text, max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        for m in models:  # warm-up: both models once
            await one(c, url, m, texts[0], 4)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "requests": len(results),
        "wall_s": round(wall, 2),
        "rps": round(len(results) / wall, 2),
        "p50_s": round(statistics.median(lat), 3),
        "p99_s": round(pct(lat, 0.99), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
    }


def run_vllm(model: Path, adapter: Path, texts, clients, max_tokens, rounds) -> dict:
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
        "--enable-lora",
        "--lora-modules",
        f"tuned={adapter}",
        "--max-lora-rank",
        "8",
        "--no-enable-prefix-caching",
        "--api-key",
        KEY,
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
        "--seed",
        "0",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(url))
        return median_round(url, ("base", "tuned"), texts, clients, max_tokens, rounds)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def run_ours(model: Path, adapter: Path, texts, clients, max_tokens, rounds) -> dict:
    import ray
    from ray import serve

    key_file = adapter.parent / "api_key"
    key_file.write_text(KEY)
    cfg = ServeConfig(
        model={"path": str(model), "template": "llama3"},
        adapter_root=str(adapter.parent),
        adapters={"tuned": adapter.name},
        max_lora_rank=8,
        max_model_len=MAX_MODEL_LEN,
        api_key_file=str(key_file),
    )
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        url = run_local(cfg, port=free_port())
        asyncio.run(wait_ready(url))
        return median_round(url, ("base", "tuned"), texts, clients, max_tokens, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llama3", Path(tmp) / "model", corpus_file="data/sample/haruhi_train.json")
        adapter = random_lora_adapter(model, Path(tmp) / "adapters" / "tuned", target="all-linear")
        texts = prompts(a.requests)
        vllm = run_vllm(model, adapter, texts, a.clients, a.max_tokens, a.rounds)
        ours = run_ours(model, adapter, texts, a.clients, a.max_tokens, a.rounds)
    print(
        f"{a.requests} streaming requests, {a.clients} concurrent clients, max_tokens {a.max_tokens}, "
        f"half base / half adapter, tiny llama3 on vllm-cpu; median of {a.rounds} rounds"
    )
    print(f"{'':8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'TTFT p50':>9} {'TTFT p99':>9}")
    for name, r in (("vLLM", vllm), ("rp_ray", ours)):
        print(f"{name:8} {r['rps']:>7} {r['p50_s']:>7} {r['p99_s']:>7} {r['ttft_p50_s']:>9} {r['ttft_p99_s']:>9}")
    print(
        f"ratios rp_ray/vLLM: req/s {ours['rps'] / vllm['rps']:.2f}, p50 {ours['p50_s'] / vllm['p50_s']:.2f}, "
        f"p99 {ours['p99_s'] / vllm['p99_s']:.2f}, TTFT p50 {ours['ttft_p50_s'] / vllm['ttft_p50_s']:.2f}"
    )
    print(json.dumps({"vllm": vllm, "rp_ray": ours}))


if __name__ == "__main__":
    main()
