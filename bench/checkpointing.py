"""Gradient checkpointing on CPU: one training step's peak memory and time, with and without it.

    python bench/checkpointing.py                    # the eval bench's 65M llama, cutoff 1024, micro-batch 4 x 2
    python bench/checkpointing.py --micro-batch 2 --cutoff 512

The model is the eval bench's (the tiny-model builder at vocab 8000, hidden 768, 10 layers; random weights, cached
under outputs/bench), set up by training's own functions (``prepare_for_lora``, ``build_engine``,
``optimizer_step``) under a world-of-one gloo group, exactly as ``jobs/train.py`` runs a worker. Each setting runs in
a fresh process; its peak is the highest resident memory sampled every 2 ms during a timed step, less the memory
held just before it (the step's own working memory: activations, gradients, logits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one_setting(checkpointing: bool, cutoff: int, micro_batch: int, accumulation: int) -> dict:
    import psutil
    import torch
    import torch.distributed as dist

    from rp_ray.cluster import free_port
    from rp_ray.config import TrainConfig, load_config
    from rp_ray.llm.models import load_model
    from rp_ray.llm.template import IGNORE_INDEX
    from rp_ray.llm.tiny_model import build_tiny_model
    from rp_ray.train.batching import collate
    from rp_ray.train.deepspeed_config import deepspeed_config
    from rp_ray.train.step import World, build_engine, join_deepspeed, optimizer_step, prepare_for_lora

    torch.set_num_threads(2)
    model_dir = build_tiny_model(
        "llama3", ROOT / "outputs/bench/llama3-65m", vocab_size=8000, hidden_size=768, num_layers=10
    )
    cfg = load_config(
        TrainConfig,
        ROOT / "jobs/configs/tiny_llama3.yaml",
        [
            f"model.path={model_dir}",
            "num_workers=1",
            f"per_device_batch_size={micro_batch}",
            f"gradient_accumulation_steps={accumulation}",
            f"gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    world = World(0, 1, torch.device("cpu"))
    join_deepspeed(world)
    model = prepare_for_lora(cfg, load_model(model_dir))
    engine, _ = build_engine(cfg, model, total_steps=4, ds_config=deepspeed_config(cfg, bf16=False))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(micro_batch * accumulation):
        ids = torch.randint(10, 8000, (cutoff,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (cutoff * 7 // 10) + ids[cutoff * 7 // 10 :]})
    batches = [collate(rows[i : i + micro_batch], pad_id=0) for i in range(0, len(rows), micro_batch)]
    optimizer_step(engine, batches, world, accumulation)  # warm-up: optimizer state, allocator pools

    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    before = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    loss, tokens = optimizer_step(engine, batches, world, accumulation)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    dist.destroy_process_group()
    return {
        "gradient_checkpointing": checkpointing,
        "step_s": round(seconds, 2),
        "tokens": tokens,
        "loss": round(loss, 5),
        "step_peak_mib": round((peak[0] - before) / 2**20, 1),
        "rss_before_mib": round(before / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cutoff", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_setting(a.child == "on", a.cutoff, a.micro_batch, a.accumulation)), flush=True)
        return
    results = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--child", setting, "--cutoff", str(a.cutoff)]
        cmd += ["--micro-batch", str(a.micro_batch), "--accumulation", str(a.accumulation)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        results.append(json.loads(p.stdout.splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    off, on = results
    print(
        json.dumps(
            {
                "peak_drop": round(1 - on["step_peak_mib"] / off["step_peak_mib"], 3),
                "time_ratio": round(on["step_s"] / off["step_s"], 2),
                "same_loss": abs(on["loss"] - off["loss"]) < 1e-4,
            }
        )
    )


if __name__ == "__main__":
    main()
