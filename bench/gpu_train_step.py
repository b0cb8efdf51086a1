"""The real LoRA training step on one GPU: rp_ray's ``optimizer_step`` under a plain NCCL group of world size 1.

No Ray and no vLLM: the model is a random-weight copy of a real architecture (speed does not depend on the weights),
wrapped in peft LoRA exactly as training does (``lora.target=all``, the shipped config's rank), inside DeepSpeed
(ZeRO-2 and ZeRO-3) with the shipped 4-GPU config's micro-batch and accumulation, bf16, full ``cutoff_len``
sequences. Prints, per shape and stage: non-pad tokens/s per GPU, peak GPU memory and MFU.

    python bench/gpu_train_step.py                         # llama31_8b and gpt_oss_20b, ZeRO-2 and ZeRO-3
    python bench/gpu_train_step.py --shape llama31_8b --stages 2 --steps 6
    python bench/gpu_train_step.py --shape tiny            # CPU smoke run (gloo), what the test suite runs

MFU counts 4 x (active parameters) FLOPs per token for a LoRA step (forward 2N; backward 2N for activation
gradients, none for frozen weights) plus attention scores (8 x layers x seq x attention width per token, causal
halved), over the GPU's dense bf16 peak (989 TFLOP/s on H100 / H200 / H800 unless --peak-tflops).
gpt-oss-20b runs dequantized to bf16 (its MXFP4 experts are frozen 3-D weights either way); with fewer layers
than the real 24 when --gpt-oss-layers says so, which the output states.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist

from rp_ray.config import TrainConfig, load_config
from rp_ray.template import IGNORE_INDEX
from rp_ray.train.batching import collate
from rp_ray.train.worker import World, build_engine, lora_targets, optimizer_step

SHIPPED = "jobs/configs/llama31_8b_4gpu.yaml"


def model_config(shape: str, gpt_oss_layers: int):
    from transformers import GptOssConfig, LlamaConfig

    if shape == "llama31_8b":
        return LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        )
    if shape == "gpt_oss_20b":
        return GptOssConfig(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=gpt_oss_layers,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
            max_position_embeddings=131072,
            layer_types=["sliding_attention", "full_attention"] * (gpt_oss_layers // 2)
            + ["sliding_attention"] * (gpt_oss_layers % 2),
            tie_word_embeddings=False,
        )
    return LlamaConfig(  # tiny: the CPU smoke run
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def active_params(model, shape_cfg) -> int:
    """Parameters a token passes through: MoE layers count only the experts it is routed to."""
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(shape_cfg, "num_local_experts", None)
    if not experts:
        return total
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - expert_params + expert_params * shape_cfg.num_experts_per_tok // experts


def flops_per_token(n_active: int, shape_cfg, seq: int) -> float:
    width = shape_cfg.num_attention_heads * getattr(
        shape_cfg, "head_dim", shape_cfg.hidden_size // shape_cfg.num_attention_heads
    )
    return 4 * n_active + 8 * shape_cfg.num_hidden_layers * seq * width / 2


def synthetic_batches(cfg: TrainConfig, vocab: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """One optimizer step of full-length examples; the last 30% of each is the labelled reply."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cfg.gradient_accumulation_steps):
        exs = []
        for _ in range(cfg.per_device_batch_size):
            ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
            cut = int(seq * 0.7)
            exs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
        out.append(collate(exs, pad_id=0))
    return out


def run_one(shape: str, stage: int, steps: int, cutoff: int, world: World, gpt_oss_layers: int, peak: float) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    overrides = [f"deepspeed.stage={stage}", "num_workers=1", f"data.cutoff_len={cutoff}"]
    if shape == "tiny":
        overrides += ["per_device_batch_size=2", "gradient_accumulation_steps=2"]
    cfg = load_config(TrainConfig, SHIPPED, overrides)
    shape_cfg = model_config(shape, gpt_oss_layers)
    dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with world.device:
        model = AutoModelForCausalLM.from_config(shape_cfg, dtype=dtype)
    if shape == "gpt_oss_20b":
        model.config._attn_implementation = "flex_attention" if world.device.type == "cuda" else "eager"
    model.config.use_cache = False
    if world.device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    n_active = active_params(model, shape_cfg)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha or 2 * cfg.lora.rank,
        target_modules=lora_targets(model, cfg.lora.target),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    engine, _ = build_engine(cfg, model, total_steps=steps + 2, world=world, bf16=dtype == torch.bfloat16)
    batches = synthetic_batches(cfg, shape_cfg.vocab_size, cutoff, seed=1)
    cuda = world.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    optimizer_step(engine, batches, world, cfg.gradient_accumulation_steps)  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        _, n = optimizer_step(engine, batches, world, cfg.gradient_accumulation_steps)
        tokens += n
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tps = tokens / seconds
    result = {
        "shape": shape,
        "layers": shape_cfg.num_hidden_layers,
        "zero_stage": stage,
        "dtype": str(dtype),
        "micro_batch": cfg.per_device_batch_size,
        "accumulation": cfg.gradient_accumulation_steps,
        "cutoff": cutoff,
        "gradient_checkpointing": cuda,
        "active_params": n_active,
        "steps_timed": steps,
        "tokens_per_s_per_gpu": round(tps, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mfu": round(tps * flops_per_token(n_active, shape_cfg, cutoff) / peak, 4) if cuda else None,
    }
    if shape == "gpt_oss_20b" and shape_cfg.num_hidden_layers != 24:
        result["note"] = f"gpt-oss-20b shape with {shape_cfg.num_hidden_layers} of its 24 layers"
    del engine, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["llama31_8b", "gpt_oss_20b", "tiny", "all"], default="all")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages to run, comma-separated")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--cutoff", type=int, default=2048)
    ap.add_argument("--gpt-oss-layers", type=int, default=24)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    if a.shape not in ("tiny",) and not cuda:
        raise SystemExit("no CUDA GPU here: run --shape tiny for the CPU smoke run")
    os.environ.setdefault("LOCAL_RANK", "0")  # as torchrun sets it; DeepSpeed requires it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    world = World(0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(0)
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    shapes = ["llama31_8b", "gpt_oss_20b"] if a.shape == "all" else [a.shape]
    results = []
    for shape in shapes:
        for stage in (int(x) for x in a.stages.split(",")):
            try:
                r = run_one(shape, stage, a.steps, a.cutoff, world, a.gpt_oss_layers, a.peak_tflops * 1e12)
            except torch.OutOfMemoryError as e:
                r = {"shape": shape, "zero_stage": stage, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
