"""The per-worker training loop: peft LoRA under DeepSpeed, fed by this worker's Ray Data shard.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rp_ray.config import TrainConfig
from rp_ray.models import load_model, resolve_attn_implementation, resolve_dtype
from rp_ray.template import IGNORE_INDEX
from rp_ray.train.batching import PaddingStats, Plan, collate, imbalance, plan_epoch, steps_per_epoch
from rp_ray.train.deepspeed_config import deepspeed_config

log = logging.getLogger("rp_ray.train")

ADAPTER_DIR = "adapter"
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


def save_checkpoint(engine, cfg: TrainConfig, rank: int, out: Path, state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard and RNG; rank 0 adds the adapter and the train state."""
    adapter = adapter_state(engine, cfg.deepspeed.stage)
    engine.save_checkpoint(str(out / DS_DIR), tag="state", exclude_frozen_parameters=True)
    torch.save(rng_state(), out / f"rng_rank{rank}.pt")
    if rank == 0:
        engine.module.save_pretrained(out / ADAPTER_DIR, state_dict=adapter, safe_serialization=True)
        (out / STATE_FILE).write_text(json.dumps(state))


def restore_checkpoint(engine, rank: int, ckpt_dir: Path) -> dict[str, Any]:
    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag="state", load_module_strict=False)
    set_rng_state(torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=True))
    return json.loads((ckpt_dir / STATE_FILE).read_text())


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config = {"cfg": TrainConfig.model_dump(), "pad_id": int}``.

    The Ray glue around :func:`setup` and :func:`optimizer_step`: this rank's rows, the batch plan, resume,
    and the logging / checkpoint cadence.
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

    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r["idx"])
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
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

    state: dict[str, Any] = {"step": 0, "history": [], "tokens": 0, "train_seconds": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore_checkpoint(engine, rank, Path(d))
        if rank == 0:
            log.info("resumed from checkpoint at step %d", state["step"])
    elif cfg.fail_at_step is not None and rank == world.size - 1:
        log.warning(
            "fail_at_step=%d: this worker will exit abruptly at that step (first attempt only)", cfg.fail_at_step
        )

    padding = PaddingStats()
    gauges = _gauges() if rank == 0 else {}
    plans: dict[int, Plan] = {}
    imbalances: list[float] = []
    start_step = state["step"]
    t_start = t_attempt = t_since = time.perf_counter()
    tokens_since = 0
    engine.train()
    for step in range(state["step"], total_steps):
        epoch, in_epoch = divmod(step, per_epoch)
        if epoch not in plans:  # the same plan on every rank: same rows, same seed
            plans = {
                epoch: plan_epoch(lengths, **sizes, seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length)
            }
            padding.add_plan(plans[epoch], lengths)
            imbalances.append(imbalance(plans[epoch], lengths))
        if cfg.fail_at_step == step and ckpt is None and rank == world.size - 1:
            os._exit(1)  # simulate a crashed worker process
        micro_batches = [collate([rows[i] for i in mb], pad_id) for mb in plans[epoch][in_epoch][rank]]
        loss, n_tokens = optimizer_step(engine, micro_batches, world, cfg.gradient_accumulation_steps)
        lr = scheduler.get_last_lr()[0]
        state["step"] = step + 1
        state["tokens"] += n_tokens
        state["history"].append({"step": step + 1, "loss": loss, "lr": lr})
        tokens_since += n_tokens
        metrics = {"step": step + 1, "epoch": (step + 1) / per_epoch, "loss": loss, "lr": lr}

        last = step + 1 == total_steps
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
        if (step + 1) % cfg.checkpoint_every_steps == 0 or last:
            state["train_seconds"] += time.perf_counter() - t_start
            t_start = time.perf_counter()
            state["padding_ratio"] = padding.ratio
            state["rank_imbalance"] = sum(imbalances) / len(imbalances)
            state |= {"steps_per_epoch": per_epoch, "total_steps": total_steps, "world_size": world.size}
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(engine, cfg, rank, Path(d), state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        elif log_now:  # report() is a barrier across workers: only as often as the user wants to see progress
            ray.train.report(metrics)
