"""The training step without Ray: ``optimizer_step`` under a plain ``torch.distributed`` gloo group of world size 1.

The model is a fixed-init tiny Llama (its own small config and seed, independent of the tokenizer the other
tests train), so its first loss is a pinned golden value. A loss reported at the wrong scale (a constant
factor, e.g. forgetting to undo DeepSpeed's division by the accumulation steps) fails the loss-scale test,
which compares against the model's own mean loss computed by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rp_ray.cluster import free_port
from rp_ray.config import ModelConfig, TrainConfig
from rp_ray.llm.template import IGNORE_INDEX
from rp_ray.train.batching import collate
from rp_ray.train.deepspeed_config import deepspeed_config
from rp_ray.train.step import World, build_engine, join_deepspeed, optimizer_step

VOCAB = 96
# first loss of the fixed-init model on BATCHES[0] (float32, CPU); pinned when the step was written
GOLDEN_FIRST_LOSS = 4.60871


def engine_of(cfg: TrainConfig, model, total_steps: int, world: World):
    """The DeepSpeed engine as training's ``setup`` builds it: DeepSpeed joined first, then the engine."""
    join_deepspeed(world)
    return build_engine(cfg, model, total_steps, deepspeed_config(cfg, bf16=False))


@pytest.fixture(scope="module")
def group():
    """A plain gloo process group of one rank (what a one-GPU NCCL benchmark gets, on CPU)."""
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    old = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"  # as torchrun sets it; DeepSpeed requires it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield World(rank=0, size=1, device=torch.device("cpu"))
    dist.destroy_process_group()
    if old is None:
        os.environ.pop("LOCAL_RANK", None)
    else:
        os.environ["LOCAL_RANK"] = old


def fixed_model():
    """A 2-layer Llama with seeded weights, wrapped in a LoRA adapter whose B is zero (so it starts as the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.use_cache = False
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )


def examples(seed: int, n: int) -> list[dict[str, list[int]]]:
    """Examples of different lengths whose first tokens are a prompt (-100) and the rest a labelled reply."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 5 * i
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def train_cfg(accumulation: int, micro: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(path="unused", template="llama3"),
        num_workers=1,
        per_device_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        deepspeed={"stage": 0},
        optim={"learning_rate": 1e-2, "warmup_ratio": 0.0},
    )


def mean_loss_by_hand(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """The model's own loss over all micro-batches together: HF's mean over every labelled (shifted) token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**b).loss.item() * n  # HF's loss is the mean over this batch's labelled tokens
            count += n
    return total / count


def test_first_loss_is_the_models_own_loss_and_the_golden_value(group):
    model = fixed_model()
    batches = [collate(examples(0, 3), pad_id=0)]
    want = mean_loss_by_hand(model, batches)
    engine, _ = engine_of(train_cfg(1, 3), model, 4, group)
    loss, tokens = optimizer_step(engine, batches, group, accumulation=1)
    assert loss == pytest.approx(want, rel=1e-6)
    assert loss == pytest.approx(GOLDEN_FIRST_LOSS, abs=1e-4)
    assert tokens == sum(len(e["input_ids"]) for e in examples(0, 3))


def test_loss_scale_over_accumulated_micro_batches_is_the_token_weighted_mean(group):
    """Three micro-batches of different sizes: the step's loss is the mean over all labelled tokens, not the mean of
    micro-batch means nor a multiple of it; and the step moves the LoRA weights."""
    model = fixed_model()
    exs = examples(1, 6)
    batches = [collate(exs[:1], 0), collate(exs[1:3], 0), collate(exs[3:], 0)]
    want = mean_loss_by_hand(model, batches)
    mean_of_means = sum(mean_loss_by_hand(model, [b]) for b in batches) / 3
    assert abs(want - mean_of_means) > 1e-3  # the two readings differ, so the test can tell them apart
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine, _ = engine_of(train_cfg(3, 2), model, 4, group)
    loss, _ = optimizer_step(engine, batches, group, accumulation=3)
    assert loss == pytest.approx(want, rel=1e-6)
    moved = [n for n, p in engine.module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the optimizer step changed no LoRA weight"


def test_gradient_is_that_of_the_mean_loss(group):
    """The gradient DeepSpeed accumulates equals autograd of the hand-computed mean loss (clipping off)."""
    model = fixed_model()
    exs = examples(2, 4)
    batches = [collate(exs[:2], 0), collate(exs[2:], 0)]
    ref = fixed_model()
    n_total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss = sum(ref(**b).loss * int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) / n_total
    loss.backward()
    want = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in ref.parameters() if p.requires_grad)).item()

    cfg = train_cfg(2, 2)
    cfg.optim.max_grad_norm = 1e9  # no clipping: the optimizer sees the raw gradient
    engine, _ = engine_of(cfg, model, 4, group)
    norms: list[float] = []

    def grad_norm_at_step(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item())

    handle = register_optimizer_step_pre_hook(grad_norm_at_step)
    try:
        optimizer_step(engine, batches, group, accumulation=2)
    finally:
        handle.remove()
    assert norms == [pytest.approx(want, rel=1e-4)]  # one optimizer step, with the mean loss's gradient


def test_step_collectives_never_see_a_tensor_off_the_training_device(group, monkeypatch):
    """NCCL maps collectives for CUDA tensors only ("No backend type associated with device type cpu").

    A ``cuda:gloo`` group reproduces that rule on CPU: it refuses CPU tensors. We show the rule bites (a CPU tensor
    is refused there), then record every tensor the step hands to a collective and check each sits on
    ``world.device``, the device the step trains on, so on a GPU rank they are CUDA tensors.
    """
    refused = _cpu_tensor_refused_by_cuda_only_group()
    assert refused, "a cuda:gloo group accepted a CPU tensor; the device rule cannot be shown on this torch"
    seen: list[torch.device] = []
    real = dist.all_reduce

    def recording(tensor, *a, **kw):
        seen.append(tensor.device)
        return real(tensor, *a, **kw)

    monkeypatch.setattr(dist, "all_reduce", recording)
    model = fixed_model()
    engine, _ = engine_of(train_cfg(1, 2), model, 2, group)
    optimizer_step(engine, [collate(examples(3, 2), 0)], group, accumulation=1)
    assert seen and all(d == group.device for d in seen), seen


def _cpu_tensor_refused_by_cuda_only_group() -> bool:
    """Run in a subprocess (one default group per process): all_reduce of a CPU tensor under ``cuda:gloo``."""
    import subprocess
    import sys

    code = (
        "import torch, torch.distributed as dist\n"
        f"dist.init_process_group('cuda:gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "try:\n    dist.all_reduce(torch.ones(2))\nexcept Exception as e:\n    print('REFUSED', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return "REFUSED" in r.stdout and "device type cpu" in r.stdout


def test_deepspeed_joins_the_group_without_compiling_its_inference_op(group):
    """Training's DeepSpeed never builds the shared-memory all-reduce op (a C++ JIT compile, about 35 s on 2 cores)
    that only DeepSpeed inference uses."""
    from deepspeed.comm import comm  # the module holding DeepSpeed's backend (cdb)

    engine_of(train_cfg(1, 3), fixed_model(), 4, group)
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
