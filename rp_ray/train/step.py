"""One LoRA training step, Ray-free: the model (peft LoRA on the loaded base), the DeepSpeed engine around it, the
loss of a micro-batch, an optimizer step over a global batch and the validation loss.

Everything here runs in any ``torch.distributed`` group (Ray Train's, or one started the way ``torchrun`` does): the
recipe (``rp_ray.train.recipe``) drives it inside Ray Train, the GPU check (``bench/gpu_check.py``) without Ray.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rp_ray.config import TrainConfig
from rp_ray.llm.models import load_model, resolve_attn_implementation, resolve_dtype
from rp_ray.llm.template import IGNORE_INDEX
from rp_ray.train.batching import collate
from rp_ray.train.deepspeed_config import deepspeed_config


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

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if stage == 3 else contextlib.nullcontext():
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(engine.module).items()}


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


def join_deepspeed(world: World) -> None:
    """DeepSpeed adopts the process group that is already up (Ray Train's, or one started the way ``torchrun`` does),
    without compiling its shared-memory all-reduce op.

    On CPU, ``deepspeed.init_distributed`` JIT-compiles that C++ op (``deepspeed_shm_comm``) once per virtualenv,
    slowly, under a lock file that an interrupted build leaves behind for every later build to wait on. Only
    DeepSpeed inference's tensor-parallel all-reduce (``inference_all_reduce``) uses it, and that falls back to
    ``torch.distributed.all_reduce`` without it; training's collectives never touch it, so no result changes.
    DeepSpeed reads its table of compatible ops (one module-level dict) when it would build the op.
    """
    import deepspeed
    import deepspeed.ops

    if deepspeed.comm.is_initialized():
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if world.device.type == "cuda" else "gloo")


def build_engine(cfg: TrainConfig, model, total_steps: int, ds_config: dict[str, Any]):
    """DeepSpeed engine and LR scheduler around a peft model (AdamW on the LoRA weights, cosine with warmup), in the
    process group DeepSpeed joined (:func:`join_deepspeed`, which must come first)."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio * total_steps), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine, scheduler


def setup(cfg: TrainConfig, world: World, total_steps: int):
    """Model and DeepSpeed engine for this rank: (engine, scheduler). The same LoRA init on every rank.

    DeepSpeed joins the process group first: at ZeRO-3, ``deepspeed.zero.Init`` partitions the weights while they
    load, which needs the group and the config (``HfDeepSpeedConfig`` alive during the load)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, resolve_dtype(cfg.model.dtype, world.device.type == "cuda"))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    join_deepspeed(world)
    ds_config = deepspeed_config(cfg, bf16=dtype == torch.bfloat16)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- zero.Init on load
    model = build_peft_model(cfg, dtype, world.device)
    engine, scheduler = build_engine(cfg, model, total_steps, ds_config)
    del hf_ds
    return engine, scheduler
