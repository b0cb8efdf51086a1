"""The driver side of a training run: data through Ray Data, a TorchTrainer, and the run's outputs.

``run_training(cfg)`` validates and reports the data, encodes it in Ray Data,
shards it to the workers (deterministic equal shards), runs
``train_loop_per_worker`` under Ray Train with checkpointing and fault tolerance,
then copies the final adapter out and writes the training summary and loss plot.
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

import ray
import ray.train

from rp_ray.cluster import ensure_ray
from rp_ray.config import TrainConfig
from rp_ray.data.report import load_checked_splits
from rp_ray.models import load_tokenizer
from rp_ray.template import encode_supervised, get_template
from rp_ray.train.summary import write_summary
from rp_ray.train.worker import ADAPTER_DIR, STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


class OrderedSplit(ray.train.DataConfig):
    """Equal, deterministic shards in dataset order.

    Ray Train's default ``streaming_split`` hands blocks to whichever worker asks
    first; a worker that restarts after a failure must see the same examples in the
    same steps, so the split here is fixed by row order.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for i, shard in enumerate(ds.split(world_size, equal=True)):
                shard.context.enable_progress_bars = False  # workers read their shard once; no bar per worker
                out[i][name] = shard.iterator()
        return out


class _Encoder:
    """Ray Data map_batches actor: conversations -> token ids and labels with the model's template."""

    def __init__(self, model_path: str, template: str, cutoff_len: int, enable_thinking: bool):
        self.tpl = get_template(template)
        self.tok = load_tokenizer(model_path, self.tpl)
        self.cutoff_len, self.thinking = cutoff_len, enable_thinking

    def __call__(self, batch):
        from rp_ray.data import Conversation

        ids, labels = [], []
        for raw in batch["conv"]:
            i, lab = encode_supervised(self.tok, self.tpl, Conversation.from_dict(json.loads(raw)), self.cutoff_len, self.thinking)
            ids.append(i)
            labels.append(lab)
        out = batch[["idx"]].copy()
        out["input_ids"], out["labels"] = ids, labels
        out["n_tokens"] = [len(i) for i in ids]
        return out


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths, so workers (whatever their working directory) find the same files."""
    upd = cfg.model_copy(deep=True)
    upd.model.path = os.path.abspath(cfg.model.path)
    upd.data.dataset_dir = os.path.abspath(cfg.data.dataset_dir)
    upd.output_dir = os.path.abspath(cfg.output_dir)
    upd.storage_path = os.path.abspath(cfg.storage_path or os.path.join(cfg.output_dir, "ray"))
    if cfg.deepspeed.config_file:
        upd.deepspeed.config_file = os.path.abspath(cfg.deepspeed.config_file)
    return upd


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

    cfg = resolve_paths(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpl = get_template(cfg.model.template)
    tok = load_tokenizer(cfg.model.path, tpl)  # a bad model path fails here, before any data work
    train, _, report_path = load_checked_splits(cfg.data, out / "data")
    if not train:
        raise ValueError(f"no training conversations left in {cfg.data.train}; see {report_path}")

    ensure_ray(cfg.num_workers * cfg.cpus_per_worker)
    t0 = time.perf_counter()
    items = [{"idx": i, "conv": json.dumps(c.to_dict(), ensure_ascii=False)} for i, c in enumerate(train)]
    ds = ray.data.from_items(items).map_batches(
        _Encoder,
        fn_constructor_kwargs=dict(model_path=cfg.model.path, template=cfg.model.template,
                                   cutoff_len=cfg.data.cutoff_len, enable_thinking=cfg.model.enable_thinking),
        batch_size=256,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()
    log.info("encoded %d conversations in %.1fs", len(train), time.perf_counter() - t0)

    name = cfg.run_name or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "pad_id": tok.pad_token_id},
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
        dataset_config=OrderedSplit(),
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
    extra = {"wall_seconds": round(time.perf_counter() - t0, 2), "checkpoint": result.checkpoint.path,
             "examples": len(train), "data_report": str(report_path)}
    summary_path, plot_path, summary = write_summary(state, cfg, extra, out)
    log.info("adapter: %s | summary: %s | loss plot: %s", adapter_dir, summary_path, plot_path)
    return TrainResult(adapter_dir, summary_path, plot_path, summary)
