"""Prometheus metrics of the serving app for whoever runs it, exported through Ray's metrics agent: each node's
metrics export port (cluster-internal; Prometheus finds the ports in Ray's service-discovery file), never the public
API port. Ray prefixes application metrics with ``ray_``.

rp_ray's own, labelled by ``model`` (the name a request gives: the base model, an adapter or a character) and by
``route``:

- ``rp_ray_requests`` (counter): requests by route, model and HTTP status (errors are status >= 400);
- ``rp_ray_time_to_first_token_seconds`` and ``rp_ray_inter_token_latency_seconds`` (histograms);
- ``rp_ray_prompt_tokens`` and ``rp_ray_generation_tokens`` (counters).

vLLM's engine stats (running and waiting requests, KV-cache use, its own latency histograms), labelled by the served
model, through vLLM's ``RayPrometheusStatLogger``: ``vllm_num_requests_running``, ``vllm_num_requests_waiting``,
``vllm_kv_cache_usage_perc``, ... (``ray_vllm_*`` once exported). ``serve_configs/grafana_dashboard.json`` draws them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rp_ray.serve.protocol import Delta

# seconds; a CPU replica's first token takes tenths to seconds, a GPU's milliseconds
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class ServeMetrics:
    """The app's metrics in one replica (Ray's metric objects: created where Ray runs, i.e. in the replica)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "rp_ray_requests", "Requests by route, model and HTTP status.", tag_keys=("route", "model", "status")
        )
        self.ttft = metrics.Histogram(
            "rp_ray_time_to_first_token_seconds",
            "Seconds from a request reaching the engine to its first output.",
            boundaries=TTFT_BUCKETS,
            tag_keys=("route", "model"),
        )
        self.itl = metrics.Histogram(
            "rp_ray_inter_token_latency_seconds",
            "Seconds per generated token after the first output.",
            boundaries=ITL_BUCKETS,
            tag_keys=("route", "model"),
        )
        self.prompt_tokens = metrics.Counter("rp_ray_prompt_tokens", "Prompt tokens by model.", tag_keys=("model",))
        self.generation_tokens = metrics.Counter(
            "rp_ray_generation_tokens", "Generated tokens by model.", tag_keys=("model",)
        )

    async def observe(
        self, deltas: AsyncIterator[Delta], route: str, model: str, prompt_tokens: int
    ) -> AsyncIterator[Delta]:
        """``deltas`` as they come, timing the first one and the tokens after it, counting the tokens."""
        tags = {"route": route, "model": model}
        start = last = time.monotonic()
        generated = 0
        try:
            async for d in deltas:
                now = time.monotonic()
                if generated == 0:
                    self.ttft.observe(now - start, tags=tags)
                elif d.tokens:
                    self.itl.observe((now - last) / d.tokens, tags=tags)
                last, generated = now, generated + d.tokens
                yield d
        finally:
            self.prompt_tokens.inc(prompt_tokens, tags={"model": model})
            if generated:
                self.generation_tokens.inc(generated, tags={"model": model})


class CountRequests:
    """ASGI middleware counting every request in ``rp_ray_requests`` by route (a path the app does not serve counts
    as ``other``), model (``request.state.model``: set once the request's model is known to be served, so a client
    cannot grow the label set) and status. The metrics are the app's ``state.metrics``, once a replica set them."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.routes: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        if self.routes is None:
            self.routes = frozenset(r.path for r in scope["app"].routes)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            model = str(scope.get("state", {}).get("model") or "")
            metrics.requests.inc(tags={"route": route, "model": model, "status": str(status)})
