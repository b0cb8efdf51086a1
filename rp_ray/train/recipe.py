"""The LoRA recipe every Ray Train worker runs: set up (this rank's place, the encoded rows every worker reads in
full, the model and DeepSpeed engine, a checkpoint to resume), then train step by step, evaluating, logging and
checkpointing at the configured cadence. The arithmetic of a step is ``rp_ray.train.step``'s (Ray-free); this
module is the Ray glue around it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rp_ray.config import TrainConfig
from rp_ray.llm.models import device_name
from rp_ray.train.batching import PaddingStats, Plan, collate, imbalance, plan_epoch, steps_per_epoch
from rp_ray.train.state import TrainState, peak_memory_gib, restore_checkpoint, save_checkpoint
from rp_ray.train.step import World, adapter_state, optimizer_step, setup, validation_loss
from rp_ray.train.tracking import Tracker

log = logging.getLogger("rp_ray.train")

GAUGES = {
    "loss": "training loss of the last step",
    "tokens_per_s": "non-pad tokens per second",
    "step": "optimizer steps done",
    "lr": "learning rate",
}


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def read_split(split: str) -> list[dict]:
    """This worker's copy of an encoded split, in the driver's order (every worker reads every row)."""
    import ray.train

    shard = ray.train.get_dataset_shard(split)
    rows = sorted(shard.iter_rows(), key=lambda r: r["idx"]) if shard is not None else []
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]


@dataclass
class Clock:
    """The timers of this attempt: training seconds since the last checkpoint, tokens/s since the last log line."""

    start_step: int
    t_checkpoint: float = field(default_factory=time.perf_counter)
    t_attempt: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    tokens_since_log: int = 0


class LoraRecipe:
    """``loop_config = {"cfg": TrainConfig.model_dump(), "pad_id": int, "fail_at_step": int | None}``;
    :meth:`setup`, then :meth:`train`."""

    def __init__(self, loop_config: dict[str, Any]):
        self.cfg = TrainConfig.model_validate(loop_config["cfg"])
        self.pad_id: int = loop_config["pad_id"]
        self.fail_at_step: int | None = loop_config.get("fail_at_step")
        self.best: dict[str, torch.Tensor] | None = None  # rank 0: the adapter of the lowest validation loss
        self.plans: dict[int, Plan] = {}
        self.padding = PaddingStats()
        self.imbalances: list[float] = []
        self.t_setup = time.perf_counter()

    def setup(self) -> None:
        import ray.train
        import ray.train.torch
        from ray.util.metrics import Gauge

        cfg = self.cfg
        ctx = ray.train.get_context()
        self.use_gpu = cfg.use_gpu and torch.cuda.is_available()
        device = ray.train.torch.get_device() if self.use_gpu else torch.device("cpu")
        self.world = World(ctx.get_world_rank(), ctx.get_world_size(), device)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.rows = read_split("train")
        self.val_rows = read_split("val") if cfg.eval_every_steps else []
        self.lengths = [len(r["input_ids"]) for r in self.rows]
        self.sizes = dict(
            world_size=self.world.size,
            micro_batch=cfg.per_device_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
        )
        self.per_epoch = steps_per_epoch(len(self.rows), **self.sizes)
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(self.rows)} training examples are fewer than one optimizer step of num_workers x "
                f"per_device_batch_size x gradient_accumulation_steps = {math.prod(self.sizes.values())}; "
                "lower them or add data"
            )
        self.total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * self.per_epoch)
        self.engine, self.scheduler = setup(cfg, self.world, self.total_steps)
        self.state = TrainState(
            steps_per_epoch=self.per_epoch, total_steps=self.total_steps, world_size=self.world.size
        )
        self.resumed = self._resume()
        self.state.starts.append(self.state.step)
        rank0 = self.world.rank == 0
        self.gauges = {k: Gauge(f"rp_ray_train_{k}", description=d) for k, d in GAUGES.items()} if rank0 else {}
        # rank 0 logs to the trackers live; the driver adds the artifacts to MLflow's run once the summary exists
        resumed_at = self.state.step + 1 if self.resumed else None
        self.tracker = Tracker.start(cfg, resumed_at=resumed_at) if rank0 else Tracker()

    def _resume(self) -> bool:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            self.state, self.best = restore_checkpoint(self.engine, self.world.rank, Path(d))
        if self.world.rank == 0:
            log.info("resumed from checkpoint at step %d", self.state.step)
        return True

    def train(self) -> None:
        self.clock = Clock(start_step=self.state.step)
        if not self.state.setup_seconds:  # the first attempt's: a resumed one also reads a checkpoint
            self.state.setup_seconds = self.clock.t_attempt - self.t_setup
        self.engine.train()
        try:
            for step in range(self.state.step, self.total_steps):
                self.train_step(step)
        except BaseException:
            self.tracker.finish(failed=True)  # the run shows as failed until an attempt resumes it
            raise
        self.tracker.finish(leave_open=["mlflow"])  # the driver adds the artifacts to MLflow's run and closes it
        if self.clock.start_step == self.total_steps:  # rerun of a finished run: hand its last checkpoint back
            self.save({"step": self.state.step})

    def plan(self, epoch: int) -> Plan:
        """The epoch's batch plan: the same on every rank (same rows, same seed)."""
        if epoch not in self.plans:
            plan = plan_epoch(
                self.lengths, **self.sizes, seed=self.cfg.seed, epoch=epoch, group_by_length=self.cfg.group_by_length
            )
            self.plans = {epoch: plan}
            self.padding.add_plan(plan, self.lengths)
            self.imbalances.append(imbalance(plan, self.lengths))
        return self.plans[epoch]

    def train_step(self, step: int) -> None:
        import ray.train

        cfg, done = self.cfg, step + 1
        self._fail_here(step)
        epoch, in_epoch = divmod(step, self.per_epoch)
        mine = self.plan(epoch)[in_epoch][self.world.rank]
        batches = [collate([self.rows[i] for i in mb], self.pad_id) for mb in mine]
        t0 = time.perf_counter()
        loss, n_tokens = optimizer_step(self.engine, batches, self.world, cfg.gradient_accumulation_steps)
        took = time.perf_counter() - t0  # the step alone: what the plan's calibration regresses on its tokens
        lr = self.scheduler.get_last_lr()[0]
        self.state.step = done
        self.state.tokens += n_tokens
        self.state.history.append({"step": done, "loss": loss, "lr": lr, "tokens": n_tokens, "seconds": round(took, 4)})
        self.clock.tokens_since_log += n_tokens
        metrics = {"step": done, "epoch": done / self.per_epoch, "loss": loss, "lr": lr}
        last = done == self.total_steps
        if cfg.eval_every_steps and (done % cfg.eval_every_steps == 0 or last):
            self.evaluate(metrics)
        log_now = done % cfg.logging_steps == 0 or last
        if log_now:
            self.log_progress(metrics)
        speed = {"train/tokens_per_s": metrics["tokens_per_s"]} if "tokens_per_s" in metrics else {}
        self.tracker.log_metrics({"train/loss": loss, "train/lr": lr} | speed, step=done)
        if done % cfg.checkpoint_every_steps == 0 or last:
            self.update_state()
            self.save(metrics)
        elif log_now:  # report() is a barrier across workers: only as often as the user wants to see progress
            ray.train.report(metrics)

    def _fail_here(self, step: int) -> None:
        """Fault injection for the tests (``RP_RAY_FAIL_AT_STEP`` in the driver's environment): the last worker exits
        abruptly at that step, on the first attempt only."""
        if self.fail_at_step == step and not self.resumed and self.world.rank == self.world.size - 1:
            os._exit(1)

    def evaluate(self, metrics: dict[str, Any]) -> None:
        """The validation loss into ``metrics`` and the state; the best adapter so far kept when asked."""
        cfg, step = self.cfg, metrics["step"]
        loss, tokens = validation_loss(self.engine, self.val_rows, self.world, cfg.per_device_batch_size, self.pad_id)
        metrics["eval_loss"] = loss
        improved = self.state.add_eval(step, loss, tokens)
        if cfg.load_best_adapter and improved:
            adapter = adapter_state(self.engine, cfg.deepspeed.stage)  # collective at ZeRO-3: every rank
            self.best = adapter if self.world.rank == 0 else None
        if self.world.rank == 0:
            log.info("step %d | eval loss %.4f over %d tokens", step, loss, tokens)
            self.tracker.log_metrics({"eval/loss": loss}, step=step)

    def log_progress(self, metrics: dict[str, Any]) -> None:
        """Throughput since the last log line into ``metrics``; rank 0 logs a progress line and sets the gauges."""
        clock, now, step = self.clock, time.perf_counter(), metrics["step"]
        metrics["tokens_per_s"] = clock.tokens_since_log / (now - clock.t_log)
        metrics["tokens_per_s_per_worker"] = metrics["tokens_per_s"] / self.world.size
        clock.tokens_since_log, clock.t_log = 0, now
        if self.world.rank != 0:
            return
        eta = (now - clock.t_attempt) / (step - clock.start_step) * (self.total_steps - step)
        msg = "step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.0f tok/s (%.0f per %s) | eta %s"
        speed = metrics["tokens_per_s"], metrics["tokens_per_s_per_worker"], "GPU" if self.use_gpu else "worker"
        log.info(msg, step, self.total_steps, metrics["epoch"], metrics["loss"], metrics["lr"], *speed, _fmt_eta(eta))
        for key, gauge in self.gauges.items():
            gauge.set(metrics[key])

    def update_state(self) -> None:
        """The measurements a checkpoint carries: training seconds, padding and rank imbalance so far."""
        now = time.perf_counter()
        self.state.train_seconds += now - self.clock.t_checkpoint
        self.clock.t_checkpoint = now
        self.state.padding_ratio = self.padding.ratio
        self.state.rank_imbalance = sum(self.imbalances) / len(self.imbalances)
        self.state.hardware = device_name(self.world.device)
        self.state.peak_memory_gib = max(self.state.peak_memory_gib, peak_memory_gib(self.world.device))

    def save(self, metrics: dict[str, Any]) -> None:
        """Save a checkpoint on every rank and report it with ``metrics`` to Ray Train."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(self.engine, self.cfg, self.world.rank, Path(d), self.state, self.best)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (see :class:`LoraRecipe`)."""
    recipe = LoraRecipe(loop_config)
    recipe.setup()
    recipe.train()
