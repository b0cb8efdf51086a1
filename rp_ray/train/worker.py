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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rp_ray.config import TrainConfig
from rp_ray.models import resolve_dtype
from rp_ray.template import IGNORE_INDEX
from rp_ray.train.batching import PaddingStats, collate, label_tokens, plan_epoch
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
        raise ValueError("lora.target=all found no nn.Linear layers to adapt (MoE experts are not nn.Linear); list lora.target modules")
    return sorted(names)


def build_peft_model(cfg: TrainConfig, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    from rp_ray.models import load_model

    model = load_model(cfg.model.path, str(dtype).removeprefix("torch."))
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha or 2 * cfg.lora.rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(model, cfg.lora.target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def step_loss_sum(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over labelled tokens of a micro-batch."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def adapter_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The LoRA weights on CPU, gathered from their ZeRO-3 partitions when needed."""
    import deepspeed
    from peft import get_peft_model_state_dict

    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if stage == 3 else contextlib.nullcontext()
    with gather:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def save_checkpoint(engine, cfg: TrainConfig, rank: int, out: Path, state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard and RNG; rank 0 adds the adapter and the train state."""
    adapter = adapter_state(engine, cfg.deepspeed.stage)
    engine.save_checkpoint(str(out / DS_DIR), tag="state", exclude_frozen_parameters=True)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, out / f"rng_rank{rank}.pt")
    if rank == 0:
        engine.module.save_pretrained(out / ADAPTER_DIR, state_dict=adapter, safe_serialization=True)
        (out / STATE_FILE).write_text(json.dumps(state))


def restore_checkpoint(engine, rank: int, ckpt_dir: Path) -> dict[str, Any]:
    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag="state", load_module_strict=False)
    rng = torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    return json.loads((ckpt_dir / STATE_FILE).read_text())


def _gauges():
    from ray.util.metrics import Gauge

    return {
        k: Gauge(f"rp_ray_train_{k}", description=d)
        for k, d in (("loss", "training loss of the last step"), ("tokens_per_s", "non-pad tokens per second"),
                     ("step", "optimizer steps done"), ("lr", "learning rate"))
    }


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config = {"cfg": TrainConfig.model_dump(), "pad_id": int}``."""
    import deepspeed
    import ray.train
    import transformers
    from transformers import get_cosine_schedule_with_warmup

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    pad_id = loop_config["pad_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    transformers.utils.logging.disable_progress_bar()
    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r["idx"])
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    lengths = [len(r["input_ids"]) for r in rows]
    steps_per_epoch = len(rows) // (cfg.per_device_batch_size * cfg.gradient_accumulation_steps)  # plan_epoch's step count
    if steps_per_epoch == 0:
        raise ValueError(
            f"worker {rank} got {len(rows)} examples, fewer than one step of per_device_batch_size x "
            f"gradient_accumulation_steps = {cfg.per_device_batch_size * cfg.gradient_accumulation_steps}; "
            f"lower them or add data"
        )
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)

    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    dtype = getattr(torch, resolve_dtype(cfg.model.dtype, use_gpu))
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank

    ds_cfg = deepspeed_config(cfg, bf16=dtype == torch.bfloat16)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # adopts Ray Train's process group
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 -- keeps zero.Init active while the weights load
    model = build_peft_model(cfg, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
    )
    del hf_ds

    state: dict[str, Any] = {"step": 0, "history": [], "tokens": 0, "train_seconds": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore_checkpoint(engine, rank, Path(d))
        if rank == 0:
            log.info("resumed from checkpoint at step %d", state["step"])
    elif cfg.fail_at_step is not None and rank == world - 1:
        log.warning("fail_at_step=%d: this worker will exit abruptly at that step (first attempt only)", cfg.fail_at_step)

    padding = PaddingStats()
    gauges = _gauges() if rank == 0 else {}
    plans: dict[int, list] = {}
    start_step = state["step"]
    t_start = t_attempt = t_since = time.perf_counter()
    tokens_since = 0
    engine.train()
    for step in range(state["step"], total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
                                       cfg.seed + 7919 * rank, epoch, cfg.group_by_length)}
            padding.add_plan(plans[epoch], lengths)
        if cfg.fail_at_step == step and ckpt is None and rank == world - 1:
            os._exit(1)  # simulate a crashed worker process
        micro_batches = [[rows[i] for i in mb] for mb in plans[epoch][k]]
        counts = torch.tensor([float(sum(label_tokens(mb) for mb in micro_batches)),
                               float(sum(len(e["input_ids"]) for mb in micro_batches for e in mb))])
        dist.all_reduce(counts)
        n_label, n_tokens = counts.tolist()
        scale = world * cfg.gradient_accumulation_steps / max(n_label, 1.0)
        loss_sum = torch.zeros(())
        for mb in micro_batches:
            batch = {k_: v.to(device) for k_, v in collate(mb, pad_id).items()}
            s = step_loss_sum(engine, batch)
            engine.backward(s * scale)  # DeepSpeed divides by accumulation and averages ranks; scale undoes both
            engine.step()
            loss_sum += s.detach().cpu()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / max(n_label, 1.0)
        lr = scheduler.get_last_lr()[0]
        state["step"] = step + 1
        state["tokens"] += int(n_tokens)
        state["history"].append({"step": step + 1, "loss": loss, "lr": lr})
        tokens_since += n_tokens
        metrics = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "loss": loss, "lr": lr}

        last = step + 1 == total_steps
        log_now = (step + 1) % cfg.logging_steps == 0 or last
        if log_now:
            now = time.perf_counter()
            metrics["tokens_per_s"] = tokens_since / (now - t_since)
            if rank == 0:
                eta = (now - t_attempt) / (step + 1 - start_step) * (total_steps - step - 1)
                log.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.0f tok/s | eta %s",
                         step + 1, total_steps, metrics["epoch"], loss, lr, metrics["tokens_per_s"], _fmt_eta(eta))
                for key, g in gauges.items():
                    g.set(metrics[key])
            tokens_since, t_since = 0, now
        if (step + 1) % cfg.checkpoint_every_steps == 0 or last:
            state["train_seconds"] += time.perf_counter() - t_start
            t_start = time.perf_counter()
            state["padding_ratio"] = padding.ratio
            state |= {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "world_size": world}
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(engine, cfg, rank, Path(d), state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        elif log_now:  # report() is a barrier across workers: only as often as the user wants to see progress
            ray.train.report(metrics)
