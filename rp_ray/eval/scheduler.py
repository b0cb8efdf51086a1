"""The driver side of batch evaluation: (row, run) requests handed to prediction actors on demand.

Why plain actors and a driver loop rather than Ray Data: what evaluation needs is an engine that stays full
from the first row to the last (many requests in flight, refilled the moment one finishes), a pool in which
no actor idles while another holds a backlog, and per-shard files written as shards complete (the unit of
resume). Ray Data's ``map_batches`` hands whole blocks to actors with its own queueing, so an engine sees one
block at a time and drains between blocks, and it gives no control over how many rows an actor holds. Here the
driver keeps, per actor, at most ``bound + chunk`` requests outstanding (``bound`` from the engine's capacity,
:func:`request_bound`; ``chunk`` = ``bound / 4``), sends the next small chunk to whichever actor returned one,
and so balances a pool of engines of any speed with at most one chunk queued in front of each engine.

An actor that dies (its engine failed, its node went away) has its outstanding requests handed to the others; only
when none is left does the job fail.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rp_ray.eval.engines import Output, Request

log = logging.getLogger(__name__)

# A chunk is a quarter of an engine's bound: the queue in front of an engine (at most one chunk) refills the slots of
# a burst of finished requests while the driver sends more, and no actor holds more than that beyond its bound.
CHUNKS_PER_BOUND = 4


def request_bound(info: dict[str, Any], mean_request_tokens: float, override: int | None = None) -> int:
    """How many requests an engine should hold at once: all its batch can take, as far as its KV cache allows.

    ``max_num_seqs`` caps what one engine step holds. The KV cache caps what can run without preemption (a
    preempted request is recomputed): ``kv_tokens`` / (mean prompt + reply tokens + half a block, the average
    rounding of a request up to whole KV blocks). On GPUs the first term usually binds (1024 sequences); on CPU,
    where the KV cache is a fixed ``cpu_kv_cache_gib``, the second (1 GiB holds about 57 requests of 450-token
    prompts + 64 new tokens on the 65M-parameter tiny model). ``override`` (``EvalConfig.max_inflight``) wins.
    """
    if override:
        return override
    seqs = int(info["max_num_seqs"])
    kv = int(info.get("kv_tokens") or 0)
    if kv <= 0:
        return max(1, seqs)
    per_request = mean_request_tokens + info.get("block_size", 16) / 2
    return max(1, min(seqs, int(kv // max(per_request, 1.0))))


@dataclass
class ActorState:
    index: int
    handle: Any
    bound: int = 0
    chunk: int = 1
    outstanding: int = 0
    requests_done: int = 0
    rows: list[int] = field(default_factory=list)  # the rows this actor predicted (any run)


@dataclass
class ScheduleStats:
    """What one scheduled pass did and how long each part took (seconds)."""

    prep_s: float  # actors asked for -> first engine ready (nothing can be predicted before)
    predict_s: float  # first engine ready -> last result
    first_result_s: float  # actors asked for -> first result back
    requests: int
    engines: list[dict[str, Any]]  # per actor: its info, bound, rows and start-up breakdown
    failures: list[str]
    steady_rate: float | None  # requests/s between 10% and 90% of the requests done (no start, no drain)


def steady_rate(
    timeline: list[tuple[float, int]], lo: float = 0.1, hi: float = 0.9, min_arrivals: int = 2
) -> float | None:
    """Requests per second between the moments ``lo`` and ``hi`` of all requests were done.

    ``timeline``: (wall time, requests done so far) per arrival of results. None when that window holds fewer than
    ``min_arrivals`` distinct arrival times (results that come back in a few bursts give no rate).
    """
    if not timeline:
        return None
    total = timeline[-1][1]
    i = next((k for k, p in enumerate(timeline) if p[1] >= lo * total), None)
    j = next((k for k, p in enumerate(timeline) if p[1] >= hi * total), None)
    if i is None or j is None or len({t for t, _ in timeline[i : j + 1]}) < min_arrivals:
        return None
    (ta, na), (tb, nb) = timeline[i], timeline[j]
    return (nb - na) / (tb - ta)


class Scheduler:
    """Hands ``requests`` to ``actors`` (``Predictor`` handles) in chunks, on demand; calls ``on_result`` per reply.

    ``created`` is the wall-clock time the actors were asked for (start-up times are measured from it). The
    requests of one batch (``Request.batch``, consecutive in ``requests``) always go to one actor in one chunk.
    """

    def __init__(
        self,
        actors: list[Any],
        requests: list[Request],
        on_result: Callable[[str, int, Output], None],
        created: float,
        progress: Callable[[int], None] | None = None,
        max_inflight: int | None = None,
    ):
        self.actors = [ActorState(i, a) for i, a in enumerate(actors)]
        self.pending: deque[Request] = deque(requests)
        self.total = len(requests)
        self.on_result = on_result
        self.created = created
        self.progress = progress or (lambda n: None)
        tokens = [len(r.prompt_ids) + r.max_tokens for r in requests]
        self.mean_tokens = sum(tokens) / len(tokens) if tokens else 1.0
        self.largest_batch = max((r.batch for r in requests), default=1)
        self.infos: dict[int, dict[str, Any]] = {}
        self.max_inflight = max_inflight
        self.timeline: list[tuple[float, int]] = []  # (wall time, requests done) after every returned chunk
        self.live: dict[int, ActorState] = {}
        self.inflight: dict[Any, tuple[ActorState, list[Request]]] = {}
        self.failures: list[str] = []
        self.first_ready: float | None = None
        self.first_result: float | None = None

    def _take(self, n: int) -> list[Request]:
        """The next ``n`` pending requests (fewer when fewer are left), rounded up to whole batches."""
        reqs: list[Request] = []
        while self.pending and len(reqs) < n:
            first = self.pending.popleft()
            reqs += [first, *(self.pending.popleft() for _ in range(first.batch - 1))]
        return reqs

    def _feed(self) -> None:
        """Top every live actor up to ``bound + chunk`` outstanding requests, least loaded first."""
        for st in sorted(self.live.values(), key=lambda s: s.outstanding / s.bound):
            while self.pending and st.outstanding <= st.bound:
                reqs = self._take(st.chunk)
                self.inflight[st.handle.predict.remote(reqs, st.bound)] = (st, reqs)
                st.outstanding += len(reqs)

    def _started(self, st: ActorState, ref: Any) -> None:
        """An actor's engine is up (or failed to start): size its bound and chunk from the engine's info."""
        import ray

        try:
            info = ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- the pool goes on without it; fails if none is left
            self.failures.append(f"actor {st.index} failed to start: {e}")
            log.warning("%s", self.failures[-1])
            return
        self.first_ready = self.first_ready or time.time()
        # a batch waits in the engine for all of its requests: the bound must hold the largest one
        st.bound = max(request_bound(info, self.mean_tokens, self.max_inflight), self.largest_batch)
        st.chunk = max(1, math.ceil(st.bound / CHUNKS_PER_BOUND))
        self.infos[st.index] = info
        self.live[st.index] = st
        msg = (
            "engine %d ready after %.1f s: up to %d requests in flight (max_num_seqs %d, KV cache %d tokens, "
            "mean request %.0f tokens), chunks of %d"
        )
        sizes = info["max_num_seqs"], info["kv_tokens"], self.mean_tokens
        log.info(msg, st.index, info["ready"] - self.created, st.bound, *sizes, st.chunk)

    def _returned(self, ref: Any) -> None:
        """A chunk came back: record its replies, or hand its requests back to the pool if its actor died."""
        import ray

        st, reqs = self.inflight.pop(ref)
        st.outstanding -= len(reqs)
        try:
            results = ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- the actor is gone: its rows go to the others
            if st.index in self.live:
                self.failures.append(f"actor {st.index} failed: {e}")
                log.warning("%s; its outstanding requests go to the other actors", self.failures[-1])
                self.live.pop(st.index)
                ray.kill(st.handle, no_restart=True)
            self.pending.extendleft(reversed(reqs))
            return
        self.first_result = self.first_result or time.time()
        st.requests_done += len(reqs)
        for run, row, out in results:
            st.rows.append(row)
            self.on_result(run, row, out)
        self.progress(len(reqs))
        self.timeline.append((time.time(), (self.timeline[-1][1] if self.timeline else 0) + len(reqs)))

    def run(self) -> ScheduleStats:
        import ray

        starting = {st.handle.info.remote(): st for st in self.actors}
        while self.pending or self.inflight:
            self._feed()
            waitable = list(self.inflight) + list(starting)
            if not waitable:
                raise RuntimeError(
                    f"every prediction actor failed ({len(self.failures)}); {len(self.pending)} of {self.total} "
                    f"requests left. First failure: {self.failures[0] if self.failures else 'unknown'}"
                )
            (ref,), _ = ray.wait(waitable, num_returns=1)
            if ref in starting:
                self._started(starting.pop(ref), ref)
            else:
                self._returned(ref)
        end = time.time()
        first_ready = self.first_ready or end
        return ScheduleStats(
            prep_s=first_ready - self.created,
            predict_s=end - first_ready,
            first_result_s=(self.first_result or end) - self.created,
            requests=self.total,
            engines=[self._engine_stats(st) for st in self.actors if st.index in self.infos],
            failures=self.failures,
            steady_rate=steady_rate(self.timeline),
        )

    def _engine_stats(self, st: ActorState) -> dict[str, Any]:
        info = self.infos[st.index]
        return {
            "index": st.index,
            "bound": st.bound,
            "chunk": st.chunk,
            "requests": st.requests_done,
            "rows": st.rows,
            "actor_start_s": round(info["started"] - self.created, 2),  # Ray worker process + imports
            "waited_s": round(info["waited"], 2),  # a CPU engine waits for the one before it to be ready
            "engine_s": round(info["ready"] - info["started"] - info["waited"], 2),  # engine construction
            "ready_s": round(info["ready"] - self.created, 2),
            **{k: round(v, 2) for k, v in info.get("timings", {}).items()},
            "max_num_seqs": info["max_num_seqs"],
            "kv_tokens": info["kv_tokens"],
            "device": info.get("device", "cpu"),
        }
