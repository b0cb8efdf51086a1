"""Batch evaluation: Ray Data shards the val set over a pool of engine actors, then LLaMA-Factory metrics.

Layout of ``output_dir`` (one folder per run, LLaMA-Factory's file names):

    <run>/generated_predictions.jsonl   {"prompt", "predict", "label"} per val row, in input order
                                        (+ "error" on a row that could not be predicted)
    <run>/predict_results.json          predict_bleu-4, predict_rouge-*, predict_runtime, ... n_total/n_scored/n_error
    <run>/sample_scores.jsonl           the four per-row scores behind the means
    <run>/shards/shard_NNNNN.jsonl      finished shards; a rerun skips them (resume after a kill)
    data/data_report.{json,txt}         what happened to every val row

Every val row yields exactly one output line: a prediction or its error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rp_ray.cluster import ensure_ray
from rp_ray.config import EvalConfig
from rp_ray.data import Conversation
from rp_ray.eval.engines import HfEngine, Run, VllmEngine
from rp_ray.metrics import mean_scores, score_pairs_parallel
from rp_ray.models import load_model, load_tokenizer
from rp_ray.preparation import absolute_paths, prepare
from rp_ray.reply import clean_reply
from rp_ray.template import encode_prediction, get_template

log = logging.getLogger(__name__)


def shard_path(out: Path, run: str, shard: int) -> Path:
    return out / run / "shards" / f"shard_{shard:05d}.jsonl"


def weights_signature(path: str | None) -> list | None:
    """Name, size and mtime of a model/adapter folder's weight and config files: changes when it is rebuilt."""
    if path is None:
        return None
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(cfg: EvalConfig, run: Run) -> dict[str, Any]:
    """What must match for a rerun to reuse a run's finished shards."""
    return {
        "model": cfg.model.model_dump(),
        "model_files": weights_signature(cfg.model.path),
        "adapter": run.adapter,
        "adapter_files": weights_signature(run.adapter),
        "sampling": cfg.sampling.model_dump(),
        "val": cfg.data.val,
        "dataset_dir": cfg.data.dataset_dir,
        "cutoff_len": cfg.data.cutoff_len,
        "max_samples": cfg.data.max_samples,
        "shard_size": cfg.shard_size,
        "backend": cfg.backend,
        "merge_adapter": cfg.merge_adapter,
        "prefix_caching": cfg.prefix_caching,
    }


def check_or_write_fingerprint(out: Path, cfg: EvalConfig, run: Run) -> None:
    path = out / run.name / "run_config.json"
    fp = fingerprint(cfg, run)
    if path.exists():
        old = json.loads(path.read_text())
        if old != fp:
            diff = sorted(k for k in fp if old.get(k) != fp[k])
            raise ValueError(
                f"{out / run.name} holds predictions made with different settings ({', '.join(diff)}); "
                f"use a new output_dir, or delete that folder to start over"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fp, indent=2))


def write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


class _Predictor:
    """Ray Data actor: one engine; each call predicts one shard for every run and writes its shard files."""

    def __init__(self, cfg: dict[str, Any], model_path: str, runs: list[Run], out: str):
        t0 = time.perf_counter()
        self.cfg = EvalConfig.model_validate(cfg)
        self.runs, self.out = runs, Path(out)
        self.tpl = get_template(self.cfg.model.template)
        self.tok = load_tokenizer(model_path, self.tpl)
        max_len = self.cfg.max_model_len or self.cfg.data.cutoff_len + self.cfg.sampling.max_new_tokens
        if self.cfg.backend == "vllm":
            self.engine = VllmEngine(
                model_path,
                self.tok,
                self.tpl,
                runs,
                max_len,
                self.cfg,
                self.cfg.sampling.seed or 0,
                self.cfg.model.dtype,
            )
        else:
            self.engine = HfEngine(
                model_path, self.tok, self.tpl, runs, self.cfg.use_gpu, max_len, self.cfg.model.dtype
            )
        self.prep_s = time.perf_counter() - t0

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        stats: dict[str, list] = {"shard": [], "rows": [], "errors": [], "prep_s": []}
        for shard, blob in zip(batch["shard"], batch["convs"]):
            items = json.loads(blob)
            prompts, labels, texts, seeds = [], [], [], []
            for item in items:
                ex = encode_prediction(
                    self.tok,
                    self.tpl,
                    Conversation.from_dict(item["conv"]),
                    self.cfg.data.cutoff_len,
                    self.cfg.model.enable_thinking,
                )
                prompts.append(ex.prompt_ids)
                texts.append(self.tok.decode(ex.prompt_ids, skip_special_tokens=True))
                labels.append(clean_reply(self.tpl, self.tok.decode(ex.label_ids, skip_special_tokens=False)))
                seed = self.cfg.sampling.seed
                seeds.append(None if seed is None else seed + item["index"])  # per row: independent of batching
            outputs = self.engine.generate(prompts, seeds, self.runs, self.cfg.sampling)
            n_err = 0
            for run in self.runs:
                lines = []
                for text, label, o in zip(texts, labels, outputs[run.name]):
                    rec: dict[str, Any] = {"prompt": text, "predict": o.text, "label": label}
                    if o.error:
                        rec["error"] = o.error
                        n_err += 1
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                write_atomic(shard_path(self.out, run.name, int(shard)), lines)
            stats["shard"].append(int(shard))
            stats["rows"].append(len(items))
            stats["errors"].append(n_err)
            stats["prep_s"].append(self.prep_s)
        return stats


def merge_adapter(base: str, adapter: str, dest: Path) -> str:
    """Write base + adapter as one plain model (merge_and_unload) for engines without runtime LoRA."""
    from peft import PeftModel

    if (dest / "config.json").exists():
        return str(dest)
    model = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
    model.save_pretrained(dest)
    for f in Path(base).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(f, dest / f.name)
    return str(dest)


def engine_groups(cfg: EvalConfig, out: Path) -> list[tuple[str, list[Run]]]:
    """(model path, runs sharing one engine): base + every adapter via LoRA, or one merged model per adapter."""
    base = Run("base", None)
    adapters = [Run(name, os.path.abspath(path)) for name, path in cfg.adapters.items()]
    for r in adapters:
        if not (Path(r.adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"adapters.{r.name}: {r.adapter} is not a peft adapter folder (no adapter_config.json)"
            )
    if not cfg.merge_adapter:
        return [(cfg.model.path, ([base] if cfg.include_base else []) + adapters)]
    groups = [(cfg.model.path, [base])] if cfg.include_base else []
    for r in adapters:
        groups.append((merge_adapter(cfg.model.path, r.adapter, out / "merged" / r.name), [Run(r.name, None)]))
    return groups


@dataclass
class EvalResult:
    output_dir: Path
    results: dict[str, dict[str, Any]]  # run -> predict_results


def _predict_group(
    cfg: EvalConfig, items: list[dict], model_path: str, runs: list[Run], out: Path
) -> tuple[float, float, int, int]:
    """Predict every unfinished shard of ``runs``; returns (wall s, engine preparation s, shards done, replies made)."""
    import ray
    from tqdm.auto import tqdm

    shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    todo = [s for s in range(len(shards)) if not all(shard_path(out, r.name, s).exists() for r in runs)]
    for r in runs:
        shard_path(out, r.name, 0).parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        log.info("runs %s: all %d shards already done", [r.name for r in runs], len(shards))
        return 0.0, 0.0, 0, 0
    log.info(
        "runs %s: %d of %d shards to predict (%d rows each)",
        [r.name for r in runs],
        len(todo),
        len(shards),
        cfg.shard_size,
    )
    t0 = time.perf_counter()
    ds = ray.data.from_items(
        [{"shard": s, "convs": json.dumps(shards[s], ensure_ascii=False)} for s in todo], override_num_blocks=len(todo)
    )
    ds = ds.map_batches(
        _Predictor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(), "model_path": model_path, "runs": runs, "out": str(out)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(todo))),
        num_cpus=1 if not cfg.use_gpu else 0,
        num_gpus=cfg.tensor_parallel_size if cfg.use_gpu else 0,
    )
    ds.context.enable_progress_bars = False  # our own bar counts samples
    prep, made = 0.0, 0
    total = sum(len(shards[s]) for s in todo) * len(runs)
    with tqdm(total=total, desc="predict", unit="sample", mininterval=1.0) as bar:
        for stat in ds.iter_rows():
            prep = max(prep, stat["prep_s"])
            made += stat["rows"] * len(runs)
            bar.update(stat["rows"] * len(runs))
    return time.perf_counter() - t0, prep, len(todo), made


def _finish_run(
    out: Path, run: Run, n_shards: int, wall: float, prep: float, shards_done: int, samples: int
) -> dict[str, Any]:
    lines = []
    for s in range(n_shards):
        lines += shard_path(out, run.name, s).read_text(encoding="utf-8").splitlines(keepends=True)
    write_atomic(out / run.name / "generated_predictions.jsonl", lines)
    recs = [json.loads(x) for x in lines]
    ok = [i for i, r in enumerate(recs) if "error" not in r]
    scores = score_pairs_parallel([recs[i]["predict"] for i in ok], [recs[i]["label"] for i in ok])
    write_atomic(
        out / run.name / "sample_scores.jsonl", [json.dumps({"index": i} | s) + "\n" for i, s in zip(ok, scores)]
    )
    runtime = max(wall - prep, 1e-9)
    results = mean_scores(scores) | {
        "predict_runtime": round(runtime, 4) if shards_done else 0.0,
        "predict_samples_per_second": round(samples / runtime, 3) if shards_done else 0.0,
        "predict_steps_per_second": round(shards_done / runtime, 3) if shards_done else 0.0,  # a step = a shard
        "predict_model_preparation_time": round(prep, 4),
        "n_total": len(recs),
        "n_scored": len(ok),
        "n_error": len(recs) - len(ok),
    }
    (out / run.name / "predict_results.json").write_text(json.dumps(results, indent=2))
    return results


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Predict the val set with the base model and/or adapters, score it, write LLaMA-Factory-named outputs."""
    cfg = absolute_paths(cfg)
    out = Path(cfg.output_dir)
    val = prepare(cfg.model, cfg.data, out / "data", need=("val",)).val
    items = [{"index": i, "conv": c.to_dict()} for i, c in enumerate(val)]

    ensure_ray(cfg.num_actors + 1, resume_hint=f"rerun the same eval with output_dir={out}: finished shards are kept")
    groups = engine_groups(cfg, out)
    results: dict[str, dict[str, Any]] = {}
    n_shards = -(-len(items) // cfg.shard_size)
    for model_path, runs in groups:
        for r in runs:
            check_or_write_fingerprint(out, cfg, r)
        wall, prep, shards_done, samples = _predict_group(cfg, items, model_path, runs, out)
        for r in runs:
            results[r.name] = _finish_run(out, r, n_shards, wall, prep, shards_done, samples)
            log.info(
                "%s: %s",
                r.name,
                {k: v for k, v in results[r.name].items() if k.startswith(("predict_b", "predict_r", "n_"))},
            )
    (out / "eval_summary.json").write_text(json.dumps(results, indent=2))
    return EvalResult(out, results)
