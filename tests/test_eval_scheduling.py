"""How batch evaluation feeds its engines: in-flight bound, balance over a pool, kill and resume.

These tests run the real pipeline (driver, scheduler, Ray actors, shard files) with a stand-in engine: an async
object with the engine's ``generate`` interface that sleeps a little per request and logs, per actor, when each
(row, run) request entered and left and how many were in flight. A real engine would hide exactly what is
tested here, the scheduling: with vLLM the timings depend on the model and the machine, and its own queue would
absorb an over-full feed without a trace. The stand-in makes the feed observable and fast. That the real engine
gives the right replies is tested in test_eval.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import ray.cloudpickle

from rp_ray.config import DataConfig, EvalConfig, load_config
from rp_ray.data import load_splits
from rp_ray.eval import run_eval
from rp_ray.eval.engines import BACKENDS, Output, Request

REPO = Path(__file__).resolve().parents[1]
if __name__ != "__main__":  # the stand-in engines travel to the actors by value: workers need not import this module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeEngine:
    """Stand-in for ``AsyncVllmEngine``: same constructor, attributes and ``generate``; sleeps instead of computing.

    Per engine index (actor), ``delays`` sets the seconds a request takes and ``start_delays`` the seconds the
    engine takes to build. Every request start and end is appended to ``<log_dir>/engine_<index>.jsonl``, and when
    the build began and ended is written to ``<log_dir>/build_<index>.json``.
    """

    log_dir = ""
    max_num_seqs = 4
    block_size = 16
    delays: dict[int, float] = {}
    start_delays: dict[int, float] = {}

    def __init__(self, cfg: EvalConfig, model_path: str, runs, stops: list[int], index: int = 0):
        begin = time.time()
        time.sleep(self.start_delays.get(index, 0.0))
        build = {"begin": begin, "ready": time.time()}
        (Path(self.log_dir) / f"build_{index}.json").write_text(json.dumps(build))
        self.index = index
        self.kv_tokens = 10**9  # the bound is max_num_seqs
        self.timings = {"build_engine_s": self.start_delays.get(index, 0.0)}
        self.delay = self.delays.get(index, 0.05)
        self.inflight = 0
        self.log = (Path(self.log_dir) / f"engine_{index}.jsonl").open("a", encoding="utf-8")

    def _event(self, kind: str, req: Request) -> None:
        rec = {"t": time.time(), "kind": kind, "row": req.row, "run": req.run, "inflight": self.inflight}
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()

    async def generate(self, req: Request) -> Output:
        self.inflight += 1
        self._event("start", req)
        # requests of one row differ a little in length, as replies do
        await asyncio.sleep(self.delay * (0.8 + 0.4 * ((req.row * 7919) % 11) / 10))
        self.inflight -= 1
        self._event("end", req)
        return Output(text=f"{req.run} reply to row {req.row}")

    def shutdown(self) -> None:
        self.log.close()


def fake_engine(log_dir: Path, **attrs) -> type:
    log_dir.mkdir(parents=True, exist_ok=True)
    return type("Fake", (FakeEngine,), {"log_dir": str(log_dir), **attrs})


def run_eval_with(engine: type, cfg: EvalConfig):
    """``run_eval`` with the stand-in as the vllm backend's engine (the driver hands it to the actors)."""
    with patch.dict(BACKENDS, vllm=engine):
        return run_eval(cfg)


def events(log_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for p in sorted(log_dir.glob("engine_*.jsonl")):
        out[int(p.stem.split("_")[1])] = [json.loads(x) for x in p.read_text().splitlines()]
    return out


def fake_adapter(path: Path) -> Path:
    """An adapter folder the pipeline accepts: a config and whole safetensors weights (the stand-in engine never
    reads them)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(path / "adapter_model.safetensors"))
    return path


def eval_cfg(model: Path, out: Path, *overrides: str) -> EvalConfig:
    return load_config(
        EvalConfig,
        REPO / "jobs/configs/eval_tiny_llama3.yaml",
        [f"model.path={model}", f"output_dir={out}", "adapters={}", "shard_size=10", *overrides],
    )


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def assert_one_line_per_row_in_order(out: Path, runs: list[str]) -> None:
    _, val, _ = load_splits(DataConfig(train=[], use_sample=True))
    for run in runs:
        rows = read(out / run / "generated_predictions.jsonl")
        assert len(rows) == len(val) == 100
        assert [r["predict"] for r in rows] == [f"{run} reply to row {i}" for i in range(100)]
        assert [r["label"] for r in rows] == [c.messages[-1].content for c in val]


def test_requests_stay_in_flight_up_to_the_bound(ray_cluster, tiny_llama3, tmp_path):
    """One engine, bound 6: never more than 6 requests inside it, and 6 nearly all the time until the rows run out."""
    engine = fake_engine(tmp_path / "log", max_num_seqs=6, delays={0: 0.1})
    cfg = eval_cfg(tiny_llama3, tmp_path / "out", f"adapters.tuned={fake_adapter(tmp_path / 'a')}", "num_actors=1")
    run_eval_with(engine, cfg)
    ev = events(tmp_path / "log")[0]
    starts = [e for e in ev if e["kind"] == "start"]
    assert len(starts) == 200  # 100 rows x (base, tuned): one request each, one pass
    assert max(e["inflight"] for e in ev) == 6
    # time-weighted requests in flight from the first start to the last start (then the engine drains by design)
    t_end = starts[-1]["t"]
    level, t_prev, area = 0, ev[0]["t"], 0.0
    for e in ev:
        if e["t"] > t_end:
            break
        area += level * (e["t"] - t_prev)
        level, t_prev = e["inflight"], e["t"]
    mean = area / (t_end - ev[0]["t"])
    assert mean >= 0.8 * 6, mean
    assert_one_line_per_row_in_order(tmp_path / "out", ["base", "tuned"])
    timings = json.loads((tmp_path / "out" / "engines.json").read_text())["base,tuned"]
    assert timings["engines"][0]["bound"] == 6 and timings["engines"][0]["requests"] == 200


def test_actors_are_balanced(ray_cluster, tiny_llama3, tmp_path):
    """Three engines: one four times slower, one ready a second late. Rows go where there is room, so the slow
    one gets fewer, the late one still works, and all three finish within about two of the slow engine's
    request times of each other (pre-assigned shards would leave the slow one a third of the work at the end).
    CPU engines build one after another, and the first ones predict meanwhile."""
    engine = fake_engine(
        tmp_path / "log", max_num_seqs=4, delays={0: 0.1, 1: 0.4, 2: 0.1}, start_delays={0: 0.5, 1: 1.5, 2: 1.0}
    )
    a, b = fake_adapter(tmp_path / "a"), fake_adapter(tmp_path / "b")
    cfg = eval_cfg(tiny_llama3, tmp_path / "out", f"adapters.a={a}", f"adapters.b={b}", "num_actors=3")
    run_eval_with(engine, cfg)
    ev = events(tmp_path / "log")
    got = {i: [(e["row"], e["run"]) for e in evs if e["kind"] == "start"] for i, evs in ev.items()}
    pairs = [p for rows in got.values() for p in rows]
    assert len(pairs) == len(set(pairs)) == 300  # every (row, run) exactly once, over the pool
    assert set(got) == {0, 1, 2} and all(got.values())
    assert len(got[1]) < len(got[0]) / 2 and len(got[1]) < len(got[2]) / 2  # the slow engine gets fewer
    last = {i: max(e["t"] for e in evs if e["kind"] == "end") for i, evs in ev.items()}
    assert max(last.values()) - min(last.values()) < 2.5, last
    build = {i: json.loads((tmp_path / "log" / f"build_{i}.json").read_text()) for i in range(3)}
    assert build[0]["ready"] <= build[1]["begin"] and build[1]["ready"] <= build[2]["begin"], build
    first_start = {i: min(e["t"] for e in evs if e["kind"] == "start") for i, evs in ev.items()}
    assert first_start[0] < build[2]["begin"], (first_start, build)  # engine 0 predicts while later ones build
    for evs in ev.values():
        assert max(e["inflight"] for e in evs) <= 4
    assert_one_line_per_row_in_order(tmp_path / "out", ["base", "a", "b"])
    engines = json.loads((tmp_path / "out" / "engines.json").read_text())["base,a,b"]["engines"]
    assert sorted(len(e["rows"]) for e in engines) == sorted(len(v) for v in got.values())


def test_killed_eval_resumes_with_one_line_per_row_in_order(ray_cluster, tiny_llama3, tmp_path):
    """Kill the job (SIGKILL, whole process group) once a few shards are written: the rerun keeps them, predicts
    only the rest, and every run ends with exactly one line per row, in input order."""
    out = tmp_path / "out"
    adapter = fake_adapter(tmp_path / "a")
    args = [str(tiny_llama3), str(out), str(adapter), str(tmp_path / "log1")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the child imports this checkout's rp_ray
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "first.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    shards = out / "tuned" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("shard_*.jsonl"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.jsonl")}
    assert 2 <= len(before) < 10, before

    engine = fake_engine(tmp_path / "log2", max_num_seqs=4, delays={0: 0.2, 1: 0.2})
    run_eval_with(engine, eval_cfg(tiny_llama3, out, f"adapters.tuned={adapter}", "num_actors=2"))
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.jsonl") if p.name in before} == before
    redone = {e["row"] // 10 for evs in events(tmp_path / "log2").values() for e in evs if e["run"] == "tuned"}
    assert redone.isdisjoint(int(name[6:11]) for name in before)  # finished shards are not predicted again
    assert_one_line_per_row_in_order(out, ["base", "tuned"])


def test_a_batch_goes_out_whole_to_one_actor():
    """Requests of one batch (the hf engine's shard of one run) are never split between chunks, so never between
    actors, and an engine's bound holds the largest batch (its requests wait in the engine for each other)."""
    from rp_ray.eval.scheduler import Scheduler

    reqs = [Request(i, "r", False, [1], 1, None, batch=3) for i in range(3)]
    reqs += [Request(i, "r", False, [1], 1, None) for i in range(3, 5)]
    s = Scheduler([], reqs, lambda *a: None, created=0.0)
    assert s.largest_batch == 3
    assert [r.row for r in s._take(2)] == [0, 1, 2]
    assert [r.row for r in s._take(1)] == [3]
    assert [r.row for r in s._take(5)] == [4] and not s._take(1)


if __name__ == "__main__":  # the job the kill test kills: run_eval with the stand-in engine, slow enough to kill
    model, out, adapter, log_dir = map(Path, sys.argv[1:5])
    engine = fake_engine(log_dir, max_num_seqs=4, delays={0: 0.2, 1: 0.2})
    run_eval_with(engine, eval_cfg(model, out, f"adapters.tuned={adapter}", "num_actors=2"))
