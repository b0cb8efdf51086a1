"""The driver side of a training run: data through Ray Data, a TorchTrainer, and the run's outputs.

``run_training(cfg)`` validates and reports the data, encodes it (in the driver, which holds the tokenizer), plans
the run (``rp_ray.plan``: a config that cannot run is refused here, before anything is scheduled), hands the
rows to every worker through Ray Data, runs ``train_loop_per_worker`` under Ray Train with checkpointing and fault
tolerance, then copies the final adapter out and writes the training summary and loss plot.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train

from rp_ray.cluster import ensure_ray
from rp_ray.config import TrainConfig
from rp_ray.files import publish_dir
from rp_ray.llm.models import check_partitionable
from rp_ray.plan.planner import TrainPlan
from rp_ray.plan.refusal import job_plan
from rp_ray.plan.report import predicted
from rp_ray.plan.tokens import SplitTokens
from rp_ray.preparation import Prepared, absolute_paths, encode_split, prepare
from rp_ray.train.recipe import train_loop_per_worker
from rp_ray.train.state import ADAPTER_DIR, BEST_ADAPTER_DIR, STATE_FILE, TrainState
from rp_ray.train.summary import write_summary
from rp_ray.train.tracking import Tracker, TrackerError, flat_config

log = logging.getLogger(__name__)


class EveryRowToEveryWorker(ray.train.DataConfig):
    """Every worker reads the whole (encoded) train set.

    The batch plan is global (all ranks take examples of the same length bucket in the same optimizer step, dealt
    out so each rank holds about the same number of tokens), so a rank must be able to take any row. A worker that
    restarts after a failure rebuilds the same plan from the same rows, so it sees the same examples in the same
    steps. Rows are token ids only: even 10k long conversations are a few hundred MB per worker.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for i in range(world_size):
                ds.context.enable_progress_bars = False  # workers read their copy once; no bar per worker
                out[i][name] = ds.iterator()
        return out


@dataclass
class TrainResult:
    adapter_dir: Path
    summary_path: Path
    plot_path: Path
    summary: dict[str, Any]


# Keys that change how a run is operated, not what it computes: a rerun may change them and still continue.
OPERATIONAL_KEYS = frozenset(
    {"max_failures", "logging_steps", "report_to", "tracking_uri", "resume", "keep_checkpoints"}
)
RUN_FILE = "train_run.json"  # in output_dir: the Ray Train run name and the config it was started with
FAIL_AT_STEP_ENV = "RP_RAY_FAIL_AT_STEP"  # tests: the last worker exits abruptly at this step (first attempt)


def run_name_for(cfg: TrainConfig, out: Path) -> str:
    """The Ray Train run this command continues or starts.

    Rerunning the same config with the same ``output_dir`` continues its run from the latest checkpoint (Ray Train
    resumes a run name it finds in the storage); a config that differs in anything but :data:`OPERATIONAL_KEYS` is
    refused with the keys, since its checkpoints would be applied to a different run. ``resume: false`` starts a
    new run (a new name) in the same ``output_dir``.
    """
    record = out / RUN_FILE
    mine = {k: v for k, v in flat_config(cfg).items() if k.split(".")[0] not in OPERATIONAL_KEYS}
    if record.is_file() and cfg.resume:
        prev = json.loads(record.read_text())
        changed = sorted(k for k in mine.keys() | prev["config"].keys() if mine.get(k) != prev["config"].get(k))
        if changed:
            diff = "; ".join(f"{k}: {prev['config'].get(k)!r} -> {mine.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out} holds run {prev['run_name']} started with another config ({diff}). Continuing it would "
                f"apply its checkpoints to a different run: use another output_dir, or resume=false to start over"
            )
        return prev["run_name"]
    name = cfg.run_name or (out.name if not record.is_file() else f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    record.write_text(json.dumps({"run_name": name, "config": mine}, indent=2))
    return name


def validation_rows(cfg: TrainConfig, train: list, val: list) -> tuple[list, list]:
    """(train, validation) conversations: ``data.val`` when given, else ``val_size`` of train held out (seeded)."""
    if not cfg.eval_every_steps:
        return train, []
    if val:
        return train, val
    if not cfg.val_size:
        raise ValueError(
            "eval_every_steps is set but there is no validation set: name data.val datasets or set val_size "
            "(a share of train to hold out, e.g. val_size=0.05)"
        )
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    n = max(1, round(len(train) * cfg.val_size))
    held = set(order[:n])
    return [c for i, c in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def run_training(cfg: TrainConfig) -> TrainResult:
    """Validate + encode data, plan (refusing a config that cannot run), train LoRA on Ray Train with DeepSpeed,
    write the adapter and summary."""
    cfg = absolute_paths(cfg)
    check_partitionable(cfg.model.path, cfg.deepspeed.stage)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    need = ("train", "val") if cfg.eval_every_steps and not cfg.val_size else ("train",)
    prep = prepare(cfg.model, cfg.data, out / "data", need=need)
    train, val = validation_rows(cfg, prep.train, prep.val)
    rows, val_rows = encode_rows(cfg, prep, train, val)
    plan = job_plan(cfg, SplitTokens.from_rows(rows, cfg.data.train, cfg.data.cutoff_len))
    name = run_name_for(cfg, out)
    hint = "run the same command again: it continues from the last checkpoint"
    ensure_ray(cfg.num_workers * cfg.cpus_per_worker, resume_hint=hint)
    datasets = {"train": ray.data.from_items(rows)} | ({"val": ray.data.from_items(val_rows)} if val_rows else {})
    t0 = time.perf_counter()
    result = trainer_for(cfg, name, datasets, prep.tok.pad_token_id).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the run in {cfg.storage_path}/{name}")
    extra = {
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "checkpoint": result.checkpoint.path,
        "run_name": name,
        "examples": len(train),
        "validation_examples": len(val),
        "data_report": str(prep.report_path),
        "predicted": predicted(plan) if plan else None,
    }
    return write_outputs(cfg, out, result.checkpoint, extra, plan)


def encode_rows(cfg: TrainConfig, prep: Prepared, train: list, val: list) -> tuple[list[dict], list[dict]]:
    """The train (and validation) rows, encoded in the driver (which holds the tokenizer)."""
    rows, stats = encode_split(prep.tok, prep.tpl, train, cfg.data.cutoff_len, cfg.model.enable_thinking)
    log.info("encoded %s", stats.summary())
    val_rows: list[dict] = []
    if val:
        val_rows, _ = encode_split(prep.tok, prep.tpl, val, cfg.data.cutoff_len, cfg.model.enable_thinking)
        log.info("validation: %d conversations, every %d steps", len(val_rows), cfg.eval_every_steps)
    return rows, val_rows


def trainer_for(cfg: TrainConfig, name: str, datasets: dict[str, ray.data.Dataset], pad_id: int):
    """The ``TorchTrainer`` of run ``name``: the recipe on every worker, checkpoints kept, failures retried."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    loop_config = {"cfg": cfg.model_dump(), "pad_id": pad_id, "fail_at_step": int(fail_at) if fail_at else None}
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=EveryRowToEveryWorker(),
    )


def write_outputs(
    cfg: TrainConfig, out: Path, checkpoint: ray.train.Checkpoint, extra: dict[str, Any], plan: TrainPlan | None = None
) -> TrainResult:
    """The adapter (the best one when asked and validation ran), the summary and loss plot, and MLflow's artifacts;
    with the run's ``plan``, the MFU it achieved (the plan's model FLOPs per token on the device's peak)."""
    adapter_dir = out / ADAPTER_DIR
    with checkpoint.as_directory() as d:
        state = TrainState.from_json((Path(d) / STATE_FILE).read_text())
        best = Path(d) / BEST_ADAPTER_DIR
        use_best = cfg.load_best_adapter and state.best_step is not None and best.is_dir()
        publish_dir(best if use_best else Path(d) / ADAPTER_DIR, adapter_dir)
    if use_best:
        log.info("adapter: the best validation loss, step %d (%.4f)", state.best_step, state.best_loss)
    extra["adapter_step"] = state.best_step if use_best else state.step
    if plan and plan.tokens_trained and state.train_seconds:
        flops = plan.model_flops * state.tokens / plan.tokens_trained
        extra["mfu"] = round(flops / (state.train_seconds * plan.world * plan.worker.peak_flops), 4)
    summary_path, plot_path, summary = write_summary(state, cfg, extra, out)
    # rank 0 logged the metrics live and left MLflow's run open: the artifacts exist only now (the other trackers
    # were closed by rank 0: a second writer would start a new run, or for TensorBoard rewrite step 0)
    if "mlflow" in cfg.report_to:
        try:
            mlflow_only = cfg.model_copy(update={"report_to": ["mlflow"]})
            Tracker.start(mlflow_only).finish(artifacts=[adapter_dir, summary_path, plot_path])
        except TrackerError as e:  # the run itself is done and written: a tracker gone since is worth a warning
            log.warning("the run's artifacts were not added to MLflow: %s", e)
    log.info("adapter: %s | summary: %s | loss plot: %s", adapter_dir, summary_path, plot_path)
    return TrainResult(adapter_dir, summary_path, plot_path, summary)
