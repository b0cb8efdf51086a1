"""The driver side of a training run: data through Ray Data, a TorchTrainer, and the run's outputs.

``run_training(cfg)`` validates and reports the data, encodes it (in the driver, which holds the tokenizer), hands
the rows to every worker through Ray Data, runs
``train_loop_per_worker`` under Ray Train with checkpointing and fault tolerance,
then copies the final adapter out and writes the training summary and loss plot.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train

from rp_ray.cluster import ensure_ray
from rp_ray.config import TrainConfig
from rp_ray.models import check_partitionable
from rp_ray.preparation import absolute_paths, encode_split, prepare
from rp_ray.train.summary import write_summary
from rp_ray.train.worker import ADAPTER_DIR, STATE_FILE, train_loop_per_worker

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


def run_training(cfg: TrainConfig) -> TrainResult:
    """Validate + encode data, train LoRA on Ray Train with DeepSpeed, write the adapter and summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    check_partitionable(cfg.model.path, cfg.deepspeed.stage)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg.model, cfg.data, out / "data", need=("train",))
    train, report_path = prep.train, prep.report_path

    name = cfg.run_name or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_ray(
        cfg.num_workers * cfg.cpus_per_worker,
        resume_hint=f"rerun with run_name={name} (and the same storage_path) to continue from its last checkpoint",
    )
    t0 = time.perf_counter()
    rows, stats = encode_split(prep.tok, prep.tpl, train, cfg.data.cutoff_len, cfg.model.enable_thinking)
    ds = ray.data.from_items(rows)
    log.info("encoded %s", stats.summary())

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "pad_id": prep.tok.pad_token_id},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": ds},
        dataset_config=EveryRowToEveryWorker(),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the run in {cfg.storage_path}/{name}")
    adapter_dir = out / ADAPTER_DIR
    with result.checkpoint.as_directory() as d:
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(Path(d) / ADAPTER_DIR, adapter_dir)
        state = json.loads((Path(d) / STATE_FILE).read_text())
    extra = {
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "checkpoint": result.checkpoint.path,
        "examples": len(train),
        "data_report": str(report_path),
    }
    summary_path, plot_path, summary = write_summary(state, cfg, extra, out)
    log.info("adapter: %s | summary: %s | loss plot: %s", adapter_dir, summary_path, plot_path)
    return TrainResult(adapter_dir, summary_path, plot_path, summary)
