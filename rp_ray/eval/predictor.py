"""The prediction actor of batch evaluation: one engine, kept full.

A :class:`Predictor` is a plain async Ray actor. It builds its engine once (base model and every adapter on it;
the backend's engine class, ``rp_ray.eval.engines.BACKENDS``, chosen by the driver) and then serves ``predict``
calls, each a small chunk of (row, run) requests handed out by the driver's :class:`rp_ray.eval.scheduler.Scheduler`.
Calls run concurrently on the actor's event loop; every request waits for one of ``bound`` slots, so at most
``bound`` requests are inside the engine at once, and the few queued behind them (the driver sends a chunk ahead)
refill a slot the moment a request finishes: the engine never drains toward one sequence between chunks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rp_ray.config import EvalConfig
from rp_ray.eval.engines import Engine, Output, Request, Run
from rp_ray.llm.models import device_name


class Predictor:
    """Ray actor body: ``engine_cls(cfg, model_path, runs, stops, index)`` built once, then ``predict`` calls."""

    def __init__(
        self,
        engine_cls: type[Engine],
        cfg: dict[str, Any],
        model_path: str,
        runs: list[Run],
        stops: list[int],
        index: int = 0,
        after: list | None = None,
    ):
        self.started = time.time()  # wall clock: the driver compares it with when it asked for the actor
        self.waited = 0.0
        if after:  # [the previous actor's info() ref]: build once that engine is up (or failed), not beside it
            import ray

            ray.wait(after, num_returns=len(after))
            self.waited = time.time() - self.started
        self.engine = engine_cls(EvalConfig.model_validate(cfg), model_path, runs, stops, index)
        self.ready = time.time()
        self.device = device_name() if cfg.get("use_gpu") else "cpu"  # no torch import for a CPU engine that has none
        self.bound = 0
        self.slots: asyncio.Semaphore | None = None

    async def info(self) -> dict[str, Any]:
        """Engine size and start-up times (called once the actor is up: the engine is built)."""
        return {
            "max_num_seqs": self.engine.max_num_seqs,
            "kv_tokens": self.engine.kv_tokens,
            "block_size": self.engine.block_size,
            "started": self.started,
            "waited": self.waited,
            "ready": self.ready,
            "timings": dict(self.engine.timings),
            "device": self.device,
        }

    async def predict(self, reqs: list[Request], bound: int) -> list[tuple[str, int, Output]]:
        """Generate every request of a chunk, at most ``bound`` of this actor's requests in the engine at once."""
        if self.slots is None or bound != self.bound:
            # slots already taken stay counted by the old semaphore; the driver sets the bound once per actor
            self.bound, self.slots = bound, asyncio.Semaphore(bound)
        slots = self.slots

        async def one(req: Request) -> Output:
            async with slots:
                return await self.engine.generate(req)

        outs = await asyncio.gather(*(one(r) for r in reqs))
        return [(r.run, r.row, o) for r, o in zip(reqs, outs)]

    async def shutdown(self) -> None:
        self.engine.shutdown()
