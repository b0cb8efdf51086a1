"""The per-worker training loop: peft LoRA under DeepSpeed, on the encoded rows every worker reads in full.

Runs inside a Ray Train worker. The loss of an optimizer step is the token-weighted
mean over the whole global batch (all micro-batches on all workers), so the update
does not depend on how the batch is split into micro-batches or workers.
Checkpoints hold the peft adapter, DeepSpeed's state without frozen weights
(optimizer, scheduler, LoRA params), each rank's RNG state and the step, so a
restarted worker continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rp_ray.config import TrainConfig
from rp_ray.llm.models import load_model, resolve_attn_implementation, resolve_dtype
from rp_ray.llm.template import IGNORE_INDEX
from rp_ray.train.batching import PaddingStats, Plan, collate, imbalance, plan_epoch, steps_per_epoch
from rp_ray.train.deepspeed_config import deepspeed_config
from rp_ray.train.tracking import Tracker

log = logging.getLogger("rp_ray.train")

ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
DS_DIR = "deepspeed"
STATE_FILE = "train_state.json"


def lora_targets(model: torch.nn.Module, target: str | list[str]) -> list[str] | str:
    """`all` = every nn.Linear but the output head (LLaMA-Factory's meaning), else the given names."""
    if target != "all":
        return target
    head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    if not names:
        raise ValueError(
            "lora.target=all found no nn.Linear layers to adapt (MoE experts are not nn.Linear); "
            "list lora.target modules"
        )
    return sorted(names)


def prepare_for_lora(cfg: TrainConfig, model):
    """What training does to a loaded base model before DeepSpeed: no KV cache, gradient checkpointing as
    configured (non-reentrant: frozen inputs need no ``requires_grad`` hook), and the peft LoRA wrapper.

    The GPU check (``bench/gpu_check.py``) calls this on its random-weight models, so it measures this step.
    """
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter_name_or_path:  # continue an adapter: its own rank and targets, its weights, trainable
        from peft import PeftModel

        return PeftModel.from_pretrained(model, cfg.adapter_name_or_path, is_trainable=True)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha or 2 * cfg.lora.rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(model, cfg.lora.target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_peft_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device):
    """The base model loaded for this rank, LoRA-wrapped. Below ZeRO-3 the weights load straight onto this rank's
    GPU; at ZeRO-3 ``deepspeed.zero.Init`` (set up by :func:`setup`) places each rank's partition as they load."""
    use_gpu = device.type == "cuda"
    attn = resolve_attn_implementation(cfg.model.template, cfg.model.attn_implementation, use_gpu)
    onto = str(device) if use_gpu and cfg.deepspeed.stage != 3 else None
    model = load_model(cfg.model.path, str(dtype).removeprefix("torch."), attn_implementation=attn, device=onto)
    return prepare_for_lora(cfg, model)


def step_loss_sum(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over labelled tokens of a micro-batch."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    # only labelled positions go to float32 (the reply, about a third of a role-play row): a float32 copy of the
    # full-vocabulary logits of every position is 2-5 GB at 2 x 2048 tokens; the loss is the same
    return F.cross_entropy(logits[:, :-1, :][keep].float(), labels[keep], reduction="sum")


@dataclass(frozen=True)
class World:
    """This process's place in the training group: rank, size and the device its tensors live on."""

    rank: int
    size: int
    device: torch.device


def optimizer_step(
    engine, micro_batches: list[dict[str, torch.Tensor]], world: World, accumulation: int
) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches; returns (loss, non-pad tokens), both over all ranks.

    The loss is the token-weighted mean over the whole global batch (every micro-batch on every rank), so the
    update does not depend on how the batch is split into micro-batches or ranks. Every tensor handed to a
    collective lives on ``world.device``: NCCL maps collectives for CUDA tensors only, and a CPU tensor there
    fails the first step of every GPU run. The loss is summed on the device and read once per step.
    ``micro_batches`` come from :func:`~rp_ray.train.batching.collate` (any device; moved here).
    """
    dev = world.device
    n_label = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    n_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    counts = torch.tensor([n_label, n_tokens], dtype=torch.float64, device=dev)
    dist.all_reduce(counts)
    total_label, total_tokens = counts.tolist()
    # DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over ranks;
    # the scale undoes both, so the gradient is that of (sum of token losses) / (labelled tokens in the batch)
    scale = world.size * accumulation / max(total_label, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
    for mb in micro_batches:
        batch = {k: v.to(dev, non_blocking=True) for k, v in mb.items()}
        s = step_loss_sum(engine, batch)
        engine.backward(s * scale)
        engine.step()
        loss_sum += s.detach()
    dist.all_reduce(loss_sum)
    return loss_sum.item() / max(total_label, 1.0), int(total_tokens)


def adapter_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The LoRA weights on CPU, gathered from their ZeRO-3 partitions when needed."""
    import deepspeed
    from peft import get_peft_model_state_dict

    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    gather = (
        deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if stage == 3 else contextlib.nullcontext()
    )
    with gather:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def rng_state() -> dict[str, Any]:
    """Every RNG that dropout and sampling draw from: torch's CPU and (when present) CUDA generators, Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


@dataclass
class TrainState:
    """Where a run is and what it has measured: the part of a checkpoint that is not DeepSpeed's, and what the
    driver's summary is written from. JSON in ``train_state.json``; the same on every rank."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} per optimizer step
    eval_history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "tokens"} per evaluation
    best_step: int | None = None  # step of the lowest validation loss so far
    starts: list[int] = field(default_factory=list)  # the step each attempt started at (0, then resumes)
    steps_per_epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    padding_ratio: float = 0.0
    rank_imbalance: float = 1.0

    @property
    def best_loss(self) -> float | None:
        return next((e["loss"] for e in self.eval_history if e["step"] == self.best_step), None)

    def add_eval(self, step: int, loss: float, tokens: int) -> bool:
        """Record a validation loss; True when it is the lowest so far."""
        best = self.best_loss
        self.eval_history.append({"step": step, "loss": loss, "tokens": tokens})
        if best is None or loss < best:
            self.best_step = step
            return True
        return False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def save_checkpoint(
    engine, cfg: TrainConfig, rank: int, out: Path, state: TrainState, best: dict[str, torch.Tensor] | None
) -> None:
    """Every rank writes its DeepSpeed shard and RNG; rank 0 adds the adapter, the best adapter so far (when
    validation runs) and the train state."""
    adapter = adapter_state(engine, cfg.deepspeed.stage)
    engine.save_checkpoint(str(out / DS_DIR), tag="state", exclude_frozen_parameters=True)
    torch.save(rng_state(), out / f"rng_rank{rank}.pt")
    if rank == 0:
        engine.module.save_pretrained(out / ADAPTER_DIR, state_dict=adapter, safe_serialization=True)
        if best is not None:
            engine.module.save_pretrained(out / BEST_ADAPTER_DIR, state_dict=best, safe_serialization=True)
        (out / STATE_FILE).write_text(state.to_json())


def restore_checkpoint(engine, rank: int, ckpt_dir: Path) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """The train state and (on rank 0) the best adapter so far, after DeepSpeed and the RNGs are restored."""
    from safetensors.torch import load_file

    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag="state", load_module_strict=False)
    set_rng_state(torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=True))
    best_file = ckpt_dir / BEST_ADAPTER_DIR / "adapter_model.safetensors"
    best = load_file(best_file) if rank == 0 and best_file.is_file() else None
    return TrainState.from_json((ckpt_dir / STATE_FILE).read_text()), best


def validation_loss(engine, rows: list[dict], world: World, micro_batch: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted loss over every validation row, spread over the ranks; (loss, labelled tokens).

    Rank r takes rows r, r + world, ...; every rank runs the same number of micro-batches (a rank out of rows runs
    one with no labels), since under ZeRO-3 each forward pass gathers parameters from all ranks. Rows are sorted by
    length first, so a micro-batch pads little.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    mine = [rows[i] for i in order[world.rank :: world.size]]
    n_batches = math.ceil(math.ceil(len(rows) / world.size) / micro_batch)
    blank = {"input_ids": [pad_id], "labels": [IGNORE_INDEX]}
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            batch = collate(mine[b * micro_batch : (b + 1) * micro_batch] or [blank], pad_id)
            batch = {k: v.to(world.device) for k, v in batch.items()}
            sums[0] += step_loss_sum(engine, batch).double()
            sums[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    engine.train()
    dist.all_reduce(sums)
    total, tokens = sums.tolist()
    return total / max(tokens, 1.0), int(tokens)


def _gauges():
    from ray.util.metrics import Gauge

    return {
        k: Gauge(f"rp_ray_train_{k}", description=d)
        for k, d in (
            ("loss", "training loss of the last step"),
            ("tokens_per_s", "non-pad tokens per second"),
            ("step", "optimizer steps done"),
            ("lr", "learning rate"),
        )
    }


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def join_deepspeed(world: World) -> None:
    """DeepSpeed adopts the process group that is already up (Ray Train's, or one started the way ``torchrun`` does),
    without compiling its shared-memory all-reduce op.

    On CPU, ``deepspeed.init_distributed`` JIT-compiles that C++ op (``deepspeed_shm_comm``): about 35 s on 2 cores,
    once per virtualenv, under a lock file that an interrupted build leaves behind for every later build to wait on.
    Only DeepSpeed inference's tensor-parallel all-reduce (``inference_all_reduce``) uses it, and that falls back to
    ``torch.distributed.all_reduce`` without it; training's collectives never touch it, so no result changes.
    DeepSpeed reads its table of compatible ops (one module-level dict) when it would build the op.
    """
    import deepspeed
    import deepspeed.ops

    if deepspeed.comm.is_initialized():
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if world.device.type == "cuda" else "gloo")


def build_engine(cfg: TrainConfig, model, total_steps: int, world: World, bf16: bool):
    """DeepSpeed engine and LR scheduler around a peft model (AdamW on the LoRA weights, cosine with warmup).

    Adopts the process group that is already up: Ray Train's, or a plain ``torch.distributed`` one started the way
    ``torchrun`` does (``LOCAL_RANK`` set, which DeepSpeed requires).
    """
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    join_deepspeed(world)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio * total_steps), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, bf16=bf16),
        dist_init_required=False,
    )
    return engine, scheduler


def setup(cfg: TrainConfig, world: World, total_steps: int):
    """Model and DeepSpeed engine for this rank: (engine, scheduler). The same LoRA init on every rank."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, resolve_dtype(cfg.model.dtype, world.device.type == "cuda"))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # join DeepSpeed to the process group before ZeRO-3's zero.Init partitions the weights while they load
    join_deepspeed(world)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(deepspeed_config(cfg, bf16=dtype == torch.bfloat16))  # noqa: F841 -- zero.Init on load
    model = build_peft_model(cfg, dtype, world.device)
    engine, scheduler = build_engine(cfg, model, total_steps, world, bf16=dtype == torch.bfloat16)
    del hf_ds
    return engine, scheduler


def fail_here(step: int, world: World, fail_at_step: int | None, resumed: bool) -> None:
    """Fault injection for the tests (``RP_RAY_FAIL_AT_STEP`` in the driver's environment): the last worker exits
    abruptly at that step, on the first attempt only."""
    if fail_at_step == step and not resumed and world.rank == world.size - 1:
        os._exit(1)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config = {"cfg": TrainConfig.model_dump(), "pad_id": int, "fail_at_step":
    int | None}``.

    The Ray glue around :func:`setup`, :func:`optimizer_step` and :func:`validation_loss`: this rank's rows, the
    batch plan, resume, and the logging / evaluation / checkpoint cadence.
    """
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    pad_id = loop_config["pad_id"]
    ctx = ray.train.get_context()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    world = World(
        ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    )
    rank = world.rank
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def read(split: str) -> list[dict]:
        shard = ray.train.get_dataset_shard(split)
        rows = sorted(shard.iter_rows(), key=lambda r: r["idx"]) if shard is not None else []
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]

    rows = read("train")
    val_rows = read("val") if cfg.eval_every_steps else []
    lengths = [len(r["input_ids"]) for r in rows]
    sizes = dict(
        world_size=world.size, micro_batch=cfg.per_device_batch_size, accumulation=cfg.gradient_accumulation_steps
    )
    per_epoch = steps_per_epoch(len(rows), **sizes)
    if per_epoch == 0:
        raise ValueError(
            f"{len(rows)} training examples are fewer than one optimizer step of num_workers x "
            f"per_device_batch_size x gradient_accumulation_steps = "
            f"{world.size * cfg.per_device_batch_size * cfg.gradient_accumulation_steps}; "
            f"lower them or add data"
        )
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * per_epoch)
    engine, scheduler = setup(cfg, world, total_steps)

    state = TrainState(steps_per_epoch=per_epoch, total_steps=total_steps, world_size=world.size)
    best: dict[str, torch.Tensor] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, best = restore_checkpoint(engine, rank, Path(d))
        if rank == 0:
            log.info("resumed from checkpoint at step %d", state.step)
    state.starts.append(state.step)

    padding = PaddingStats()
    gauges = _gauges() if rank == 0 else {}
    # rank 0 logs to the trackers live; the driver adds the artifacts to MLflow's run once the summary exists
    tracker = Tracker.start(cfg, resumed_at=state.step + 1 if ckpt is not None else None) if rank == 0 else Tracker()
    plans: dict[int, Plan] = {}
    imbalances: list[float] = []
    start_step = state.step
    t_start = t_attempt = t_since = time.perf_counter()
    tokens_since = 0
    engine.train()
    try:
        for step in range(state.step, total_steps):
            epoch, in_epoch = divmod(step, per_epoch)
            if epoch not in plans:  # the same plan on every rank: same rows, same seed
                plans = {
                    epoch: plan_epoch(lengths, **sizes, seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length)
                }
                padding.add_plan(plans[epoch], lengths)
                imbalances.append(imbalance(plans[epoch], lengths))
            fail_here(step, world, loop_config.get("fail_at_step"), resumed=ckpt is not None)
            micro_batches = [collate([rows[i] for i in mb], pad_id) for mb in plans[epoch][in_epoch][rank]]
            loss, n_tokens = optimizer_step(engine, micro_batches, world, cfg.gradient_accumulation_steps)
            lr = scheduler.get_last_lr()[0]
            state.step = step + 1
            state.tokens += n_tokens
            state.history.append({"step": step + 1, "loss": loss, "lr": lr})
            tokens_since += n_tokens
            metrics = {"step": step + 1, "epoch": (step + 1) / per_epoch, "loss": loss, "lr": lr}

            last = step + 1 == total_steps
            if cfg.eval_every_steps and ((step + 1) % cfg.eval_every_steps == 0 or last):
                metrics["eval_loss"], eval_tokens = validation_loss(
                    engine, val_rows, world, cfg.per_device_batch_size, pad_id
                )
                improved = state.add_eval(step + 1, metrics["eval_loss"], eval_tokens)
                if cfg.load_best_adapter and improved:
                    adapter = adapter_state(engine, cfg.deepspeed.stage)  # collective at ZeRO-3: every rank
                    best = adapter if rank == 0 else None
                if rank == 0:
                    log.info("step %d | eval loss %.4f over %d tokens", step + 1, metrics["eval_loss"], eval_tokens)
                    tracker.log_metrics({"eval/loss": metrics["eval_loss"]}, step=step + 1)
            log_now = (step + 1) % cfg.logging_steps == 0 or last
            if log_now:
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_since / (now - t_since)
                metrics["tokens_per_s_per_worker"] = metrics["tokens_per_s"] / world.size
                if rank == 0:
                    eta = (now - t_attempt) / (step + 1 - start_step) * (total_steps - step - 1)
                    log.info(
                        "step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.0f tok/s (%.0f per %s) | eta %s",
                        step + 1,
                        total_steps,
                        metrics["epoch"],
                        loss,
                        lr,
                        metrics["tokens_per_s"],
                        metrics["tokens_per_s_per_worker"],
                        "GPU" if use_gpu else "worker",
                        _fmt_eta(eta),
                    )
                    for key, g in gauges.items():
                        g.set(metrics[key])
                tokens_since, t_since = 0, now
            tracker.log_metrics(
                {"train/loss": loss, "train/lr": lr}
                | ({"train/tokens_per_s": metrics["tokens_per_s"]} if "tokens_per_s" in metrics else {}),
                step=step + 1,
            )
            if (step + 1) % cfg.checkpoint_every_steps == 0 or last:
                state.train_seconds += time.perf_counter() - t_start
                t_start = time.perf_counter()
                state.padding_ratio = padding.ratio
                state.rank_imbalance = sum(imbalances) / len(imbalances)
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(engine, cfg, rank, Path(d), state, best)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            elif log_now:  # report() is a barrier across workers: only as often as the user wants to see progress
                ray.train.report(metrics)
    except BaseException:
        tracker.finish(failed=True)  # the run shows as failed until an attempt resumes it
        raise
    tracker.finish(leave_open=["mlflow"])  # the driver adds the artifacts to MLflow's run and closes it
    if start_step == total_steps:  # rerun of a finished run: hand its last checkpoint back to the driver
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(engine, cfg, rank, Path(d), state, best)
            ray.train.report({"step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(d))
