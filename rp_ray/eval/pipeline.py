"""Batch evaluation: every run in one pass over the val set, engines full from the first row to the last.

The driver encodes the val rows once (the tokenizer it already loaded for the data checks), starts
``num_actors`` prediction actors (``rp_ray.eval.predictor``; each builds one engine of the configured backend,
``rp_ray.eval.engines``, serving the base model and every adapter, while the driver encodes) and hands them
(row, run) requests in small chunks, on demand (``rp_ray.eval.scheduler``): base + 3 adapters is one pass with four
requests per row, not four passes. Each engine holds as many requests as it can batch; replies come back as token
ids and the driver writes each shard's file the moment its rows are done (``rp_ray.eval.shards``), then scores
every run. ``merge_adapter`` runs one such pass per merged model.

Layout of ``output_dir`` (one folder per run, LLaMA-Factory's file names):

    <run>/generated_predictions.jsonl   {"prompt", "predict", "label"} per val row, in input order
                                        (+ "error" on a row that could not be predicted)
    <run>/predict_results.json          predict_bleu-4, predict_rouge-*, predict_runtime, ... n_total/n_scored/n_error,
                                        job_wall_seconds
    <run>/sample_scores.jsonl           the four per-row scores behind the means
    <run>/shards/shard_NNNNN.jsonl      finished shards; a rerun skips them (resume after a kill)
    engines.json                        per pass: engine start-up breakdown, bound, rows per actor, steady rate
    data/data_report.{json,txt}         what happened to every val row

Every val row yields exactly one output line: a prediction or its error. ``predict_runtime`` and
``predict_samples_per_second`` count prediction only (first engine ready -> last reply, as LLaMA-Factory's
count its predict loop), ``predict_model_preparation_time`` the engines' start-up, ``job_wall_seconds`` the whole
job (data checks, engines, prediction, scoring).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rp_ray.cluster import ensure_ray
from rp_ray.config import EvalConfig
from rp_ray.data import Conversation
from rp_ray.eval.engines import BACKENDS, Request, Run, eval_max_model_len, row_seed, too_long_output
from rp_ray.eval.metrics import mean_scores, score_pairs_parallel
from rp_ray.eval.scheduler import Scheduler
from rp_ray.eval.shards import Row, ShardWriter, shard_done, shard_lines, shard_path
from rp_ray.files import staged_dir, write_atomic
from rp_ray.llm.models import load_model, resolve_dtype, weights_problem
from rp_ray.llm.reply import clean_reply
from rp_ray.llm.template import encode_prediction, stop_token_ids
from rp_ray.plan.planner import EvalPlan
from rp_ray.plan.refusal import job_plan
from rp_ray.plan.report import predicted
from rp_ray.preparation import absolute_paths, prepare

log = logging.getLogger(__name__)


def weights_signature(path: str | None) -> list | None:
    """Name, size and mtime of a model/adapter folder's weight and config files: changes when it is rebuilt."""
    if path is None:
        return None
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(cfg: EvalConfig, run: Run) -> dict[str, Any]:
    """What must match for a rerun to reuse a run's finished shards: everything that changes a prediction or which
    rows are predicted. What only changes how fast (num_actors, cpus_per_actor, max_inflight, tensor_parallel_size)
    may change between a run and its resumption."""
    return {
        "model": cfg.model.model_dump(),
        "model_files": weights_signature(cfg.model.path),
        "adapter": run.adapter,
        "adapter_files": weights_signature(run.adapter),
        "sampling": cfg.sampling.model_dump(),
        "val": cfg.data.val,
        "dataset_dir": cfg.data.dataset_dir,
        "use_sample": cfg.data.use_sample,
        "cutoff_len": cfg.data.cutoff_len,
        "max_samples": cfg.data.max_samples,
        "shard_size": cfg.shard_size,
        "backend": cfg.backend,
        "merge_adapter": cfg.merge_adapter,
        "prefix_caching": cfg.prefix_caching,
        "use_gpu": cfg.use_gpu,  # other kernels, and model.dtype=auto picks another dtype
        "max_model_len": eval_max_model_len(cfg),  # which rows are too long, and how long a reply may grow
        "max_row_bytes": cfg.data.max_row_bytes,  # which val rows are read
    }


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_or_write_fingerprint(out: Path, cfg: EvalConfig, run: Run) -> None:
    """Record the settings of ``run`` in its folder when it starts; refuse, naming the settings that differ, to resume
    it with others (its finished shards would be mixed with predictions made differently)."""
    path = out / run.name / "run_config.json"
    fp = json.loads(json.dumps(fingerprint(cfg, run)))  # as read back: tuples are lists
    if path.exists():
        old = json.loads(path.read_text())
        if old != fp:
            diff = "; ".join(
                f"{k}: {_shown(old.get(k))} -> {_shown(fp.get(k))}"
                for k in sorted(fp.keys() | old.keys())
                if old.get(k) != fp.get(k)
            )
            raise ValueError(
                f"{out / run.name} holds predictions made with different settings ({diff}); "
                f"use a new output_dir, or delete that folder to start over"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(fp, indent=2))


def check_adapter(folder: str, what: str) -> None:
    """Refuse an adapter folder that is not a whole peft adapter: its config and its complete safetensors weights."""
    if not (Path(folder) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{what}: {folder} is not a peft adapter folder (no adapter_config.json)")
    if problem := weights_problem(folder, "adapter_model.safetensors"):
        raise ValueError(
            f"{what}: {folder} is not a complete peft adapter ({problem}), as an interrupted save leaves it; "
            f"re-run the training that writes it, or point {what} at a complete adapter"
        )


def configured_runs(cfg: EvalConfig) -> list[Run]:
    """The runs of ``cfg`` as configured: ``base`` (with include_base), then one per adapter (checked whole)."""
    adapters = [Run(name, os.path.abspath(path)) for name, path in cfg.adapters.items()]
    for r in adapters:
        check_adapter(r.adapter, f"adapters.{r.name}")
    return ([Run("base", None)] if cfg.include_base else []) + adapters


MERGE_STAMP = "rp_ray_merged_from.json"  # in a merged model's folder: the base, adapter and dtype it was made from


def merge_adapter(base: str, adapter: str, dest: Path, dtype: str = "float32") -> str:
    """Write base + adapter as one plain model (``merge_and_unload``) for engines without runtime LoRA.

    In ``dtype`` (the engines' own: bfloat16 on GPU, half of float32's memory and disk), saved in safetensors
    shards. :func:`engine_groups` runs it as a Ray task on a worker (a GPU node on GPU clusters), never in the
    driver: a merged 20B model is tens of GB of host memory that a head node does not have to spare.
    """
    from peft import PeftModel

    check_adapter(adapter, "adapter")
    stamp = {"base": weights_signature(base), "adapter": weights_signature(adapter), "dtype": dtype}
    if dest.is_dir():
        # the folder is published whole (staged_dir); one from an older, interrupted merge has a config.json but not
        # its weights, and one merged from another adapter build has another stamp
        problem = weights_problem(dest)
        if problem is None:
            try:
                made_from = json.loads((dest / MERGE_STAMP).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                made_from = None
            if made_from == json.loads(json.dumps(stamp)):
                return str(dest)
            problem = "it was merged from another base, adapter or dtype"
        log.warning("merged model %s: %s; merging again", dest, problem)
    with staged_dir(dest) as tmp:
        model = PeftModel.from_pretrained(load_model(base, dtype), adapter).merge_and_unload()
        model.save_pretrained(tmp, max_shard_size="5GB")
        for f in Path(base).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy2(f, tmp / f.name)
        (tmp / MERGE_STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    return str(dest)


def engine_groups(cfg: EvalConfig, out: Path) -> list[tuple[str, list[Run]]]:
    """(model path, runs sharing one engine): base + every adapter via LoRA, or one merged model per adapter."""
    runs = configured_runs(cfg)
    if not cfg.merge_adapter:
        return [(cfg.model.path, runs)]
    import ray

    adapters = [r for r in runs if r.adapter is not None]
    groups = [(cfg.model.path, [r for r in runs if r.adapter is None])] if cfg.include_base else []
    dtype = resolve_dtype(cfg.model.dtype, cfg.use_gpu)
    task = ray.remote(merge_adapter).options(name="merge_adapter", num_cpus=1, num_gpus=int(cfg.use_gpu), max_retries=0)
    merged = ray.get([task.remote(cfg.model.path, r.adapter, out / "merged" / r.name, dtype) for r in adapters])
    groups += [(path, [Run(r.name, None)]) for path, r in zip(merged, adapters)]
    return groups


@dataclass
class EvalResult:
    output_dir: Path
    results: dict[str, dict[str, Any]]  # run -> predict_results


@dataclass
class GroupStats:
    """One engine group's prediction pass (seconds); ``samples`` = (row, run) replies made in this job."""

    prep_s: float = 0.0
    predict_s: float = 0.0
    shards_done: int = 0
    samples: int = 0
    detail: dict[str, Any] | None = None  # the pass's engines and timings (engines.json)


def encode_rows(tok, tpl, val: list[Conversation], cfg: EvalConfig) -> list[Row]:
    """Every val row as the prediction prompt LLaMA-Factory builds (``encode_prediction``) and its label."""
    rows = []
    for i, c in enumerate(val):
        ex = encode_prediction(tok, tpl, c, cfg.data.cutoff_len, cfg.model.enable_thinking)
        prompt_text = tok.decode(ex.prompt_ids, skip_special_tokens=True)
        label = clean_reply(tpl, tok.decode(ex.label_ids, skip_special_tokens=False))
        rows.append(Row(index=i, prompt_ids=ex.prompt_ids, prompt_text=prompt_text, label=label))
    return rows


def todo_shards(out: Path, runs: list[Run], n_rows: int, shard_size: int) -> dict[str, list[int]]:
    """Run -> the shards a rerun still has to predict: those whose file is missing or does not hold each of the
    shard's rows (:func:`~rp_ray.eval.shards.shard_done`)."""
    sizes = [min(shard_size, n_rows - start) for start in range(0, n_rows, shard_size)]
    return {r.name: [s for s, n in enumerate(sizes) if not shard_done(shard_path(out, r.name, s), n)] for r in runs}


def start_predictors(cfg: EvalConfig, model_path: str, runs: list[Run], stops: list[int]) -> tuple[list[Any], float]:
    """Ask Ray for ``num_actors`` prediction actors (they build their engines meanwhile); returns them and when.

    GPU engines build side by side. CPU engines build one after another, each once the one before it is ready:
    engines starting on the same cores slow each other down, and the first predicts while the next builds.
    The actors' processes start at once either way; only the engine builds wait.
    """
    import ray

    from rp_ray.eval.predictor import Predictor

    actor = ray.remote(Predictor).options(
        num_cpus=0 if cfg.use_gpu else cfg.cpus_per_actor,
        num_gpus=cfg.tensor_parallel_size if cfg.use_gpu else 0,
        max_concurrency=1000,  # concurrent predict calls (chunks), each many requests
    )
    created = time.time()
    engine, dump = BACKENDS[cfg.backend], cfg.model_dump()
    actors: list[Any] = []
    for i in range(cfg.num_actors):
        after = [actors[-1].info.remote()] if actors and not cfg.use_gpu else None  # in a list: waited, not resolved
        actors.append(actor.remote(engine, dump, model_path, runs, stops, i, after))
    return actors, created


def stop_predictors(actors: list[Any]) -> None:
    """Shut each engine down (its engine process goes with it), then end the actors."""
    import ray

    try:
        ray.wait([a.shutdown.remote() for a in actors], num_returns=len(actors), timeout=60)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def plan_requests(cfg: EvalConfig, writer: ShardWriter, todo: dict[str, list[int]], runs: list[Run]) -> list[Request]:
    """The requests of every unfinished (run, shard): one per (row, run) whose prompt leaves room to generate; the
    other rows are given their ``too_long`` error at once.

    In input order, shard by shard, every run of a row together, so shards complete early and in order; for the
    ``hf`` engine (:class:`~rp_ray.eval.engines.HfEngine`) run by run within a shard, each carrying its batch's size.
    """
    max_len = eval_max_model_len(cfg)
    planned: list[tuple[int, Row, Run]] = []
    for s in sorted({s for shards in todo.values() for s in shards}):
        need = [r for r in runs if s in todo[r.name]]
        for row in writer.rows_of(s):
            for r in need:
                if len(row.prompt_ids) >= max_len:
                    writer.add(r.name, row.index, too_long_output(len(row.prompt_ids), max_len))
                else:
                    planned.append((s, row, r))
    batched = cfg.backend == "hf"
    if batched:
        planned.sort(key=lambda p: (p[0], runs.index(p[2])))  # stable: rows stay in order within a batch
    sizes = Counter((s, r.name) for s, _, r in planned)
    return [
        Request(
            row.index,
            r.name,
            r.adapter is not None,
            row.prompt_ids,
            min(cfg.sampling.max_new_tokens, max_len - len(row.prompt_ids)),
            row_seed(cfg.sampling, row.index),
            sizes[(s, r.name)] if batched else 1,
        )
        for s, row, r in planned
    ]


def log_engines(engines: list[dict[str, Any]]) -> None:
    msg = (
        "engine %d: ready after %.1f s (Ray actor %.1f s, waiting for the engine before it %.1f s, vLLM import "
        "%.1f s, engine build %.1f s), bound %d, %d requests"
    )
    for e in engines:
        vllm = e.get("import_vllm_s", 0.0), e.get("build_engine_s", 0.0)
        log.info(msg, e["index"], e["ready_s"], e["actor_start_s"], e["waited_s"], *vllm, e["bound"], e["requests"])


def _predict_group(
    cfg: EvalConfig, rows: list[Row], runs: list[Run], out: Path, decode, started: tuple[list[Any], float]
) -> GroupStats:
    """Every unfinished (run, shard) of one engine group in one pass: each (row, run) is one request."""
    from tqdm.auto import tqdm

    actors, created = started
    n_shards = -(-len(rows) // cfg.shard_size)
    todo = todo_shards(out, runs, len(rows), cfg.shard_size)
    writer = ShardWriter(out, rows, cfg.shard_size, todo, decode)
    requests = plan_requests(cfg, writer, todo, runs)
    msg = "runs %s: %d of %d shards to predict, %d requests (rows x runs) in one pass over %d engine(s)"
    n_todo = len({s for shards in todo.values() for s in shards})
    log.info(msg, [r.name for r in runs], n_todo, n_shards, len(requests), len(actors))
    try:
        with tqdm(total=len(requests), desc="predict", unit="sample", mininterval=1.0) as bar:
            stats = Scheduler(actors, requests, writer.add, created, bar.update, cfg.max_inflight).run()
    finally:
        stop_predictors(actors)
    assert writer.done, "every (run, shard) of the pass is written"
    log_engines(stats.engines)
    detail = {
        "prep_s": round(stats.prep_s, 2),
        "first_result_s": round(stats.first_result_s, 2),
        "predict_s": round(stats.predict_s, 2),
        "steady_samples_per_second": round(stats.steady_rate, 3) if stats.steady_rate else None,
        "requests": stats.requests,
        "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
        "reply_tokens": writer.reply_tokens,
        "failures": stats.failures,
        # what the plan's calibration re-plans the pass with (rp-ray plan --calibrate)
        "hardware": next((e["device"] for e in stats.engines if e.get("device")), "cpu"),
        "use_gpu": cfg.use_gpu,
        "backend": cfg.backend,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "cpus_per_actor": cfg.cpus_per_actor,
        "engines": stats.engines,
    }
    shards_done = len({s for _, s in writer.written})  # a step = a shard, every run of it
    return GroupStats(stats.prep_s, stats.predict_s, shards_done, len(requests), detail)


def _finish_run(out: Path, run: Run, n_shards: int, g: GroupStats) -> dict[str, Any]:
    """Join a run's shards into its predictions, score them; returns its ``predict_results`` (written by the job)."""
    lines = []
    for s in range(n_shards):
        lines += shard_lines(shard_path(out, run.name, s))
    write_atomic(out / run.name / "generated_predictions.jsonl", "".join(lines))
    recs = [json.loads(x) for x in lines]
    ok = [i for i, r in enumerate(recs) if "error" not in r]
    scores = score_pairs_parallel([recs[i]["predict"] for i in ok], [recs[i]["label"] for i in ok])
    per_row = [json.dumps({"index": i} | s) + "\n" for i, s in zip(ok, scores)]
    write_atomic(out / run.name / "sample_scores.jsonl", "".join(per_row))
    did = g.shards_done > 0
    runtime = max(g.predict_s, 1e-9)
    return mean_scores(scores) | {
        # prediction time only (engines ready -> last reply), as LLaMA-Factory's; every run of a group shares it
        "predict_runtime": round(runtime, 4) if did else 0.0,
        "predict_samples_per_second": round(g.samples / runtime, 3) if did else 0.0,
        "predict_steps_per_second": round(g.shards_done / runtime, 3) if did else 0.0,  # a step = a shard
        "predict_model_preparation_time": round(g.prep_s, 4),
        "n_total": len(recs),
        "n_scored": len(ok),
        "n_error": len(recs) - len(ok),
    }


def _predict_groups(
    cfg: EvalConfig, groups: list[tuple[str, list[Run]]], out: Path, prep, n_shards: int
) -> dict[str, dict[str, Any]]:
    """Predict every engine group's unfinished shards and score each run; writes ``engines.json``."""
    tok, tpl = prep.tok, prep.tpl
    stops = stop_token_ids(tok, tpl)
    busy = [(m, runs) for m, runs in groups if any(todo_shards(out, runs, len(prep.val), cfg.shard_size).values())]
    # the first group's engines start now and build while the driver encodes the prompts
    started = {busy[0][0]: start_predictors(cfg, busy[0][0], busy[0][1], stops)} if busy else {}
    rows = encode_rows(tok, tpl, prep.val, cfg)
    decode = lambda ids: clean_reply(tpl, tok.decode(list(ids), skip_special_tokens=False))  # noqa: E731
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, Any] = {}
    for model_path, runs in groups:
        g = GroupStats()
        if any(m == model_path for m, _ in busy):
            actors = started.pop(model_path, None) or start_predictors(cfg, model_path, runs, stops)
            g = _predict_group(cfg, rows, runs, out, decode, actors)
            timings[",".join(r.name for r in runs)] = g.detail
        else:
            log.info("runs %s: all %d shards already done", [r.name for r in runs], n_shards)
        results |= {r.name: _finish_run(out, r, n_shards, g) for r in runs}
    if timings:
        (out / "engines.json").write_text(json.dumps(timings, indent=2))
    return results


def run_predicted(plan: EvalPlan | None, name: str) -> dict[str, Any] | None:
    """What the plan said of the job and of run ``name`` (its requests and tokens), beside what it measured."""
    if plan is None:
        return None
    out = predicted(plan)
    for run in (r for r in plan.runs if r.name == name):
        out |= {"requests": run.requests, "prompt_tokens": run.prompt_tokens, "reply_tokens": run.reply_tokens}
    return out


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Predict the val set with the base model and/or adapters, score it, write LLaMA-Factory-named outputs."""
    t_job = time.perf_counter()
    cfg = absolute_paths(cfg)
    out = Path(cfg.output_dir)
    prep = prepare(cfg.model, cfg.data, out / "data", need=("val",))
    plan = job_plan(cfg)
    for r in configured_runs(cfg):  # as configured: a merged run's adapter counts too, checked before merging it
        check_or_write_fingerprint(out, cfg, r)
    hint = f"rerun the same eval with output_dir={out}: finished shards are kept"
    ensure_ray(cfg.num_actors * cfg.cpus_per_actor + 1, resume_hint=hint)
    groups = engine_groups(cfg, out)
    results = _predict_groups(cfg, groups, out, prep, -(-len(prep.val) // cfg.shard_size))
    job_wall = round(time.perf_counter() - t_job, 2)
    for name, res in results.items():
        res["job_wall_seconds"] = job_wall  # the whole job: preparation, engines, prediction, scoring
        res["predicted"] = run_predicted(plan, name)
        (out / name / "predict_results.json").write_text(json.dumps(res, indent=2))
        shown = {k: v for k, v in res.items() if k.startswith(("predict_b", "predict_r", "predict_s", "n_", "job_"))}
        log.info("%s: %s", name, shown)
    (out / "eval_summary.json").write_text(json.dumps(results, indent=2))
    return EvalResult(out, results)
