"""The DeepSpeed JSON generated from our config (or the user's own file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rp_ray.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """ZeRO stage, offload, batch sizes, clipping and precision as DeepSpeed expects them.

    A user file (``deepspeed.config_file``) replaces the generated dict, but batch
    sizes, clipping and precision are always set from our config so they cannot
    disagree with the loop.
    """
    ds = cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed.config_file {path} not found")
        out: dict[str, Any] = json.loads(path.read_text())
    else:
        zero: dict[str, Any] = {"stage": ds.stage}
        if ds.stage in (2, 3):
            zero |= {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e7}
        if ds.stage == 3:
            zero |= {"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 1e4}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        out = {"zero_optimization": zero}
    out |= {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_batch_size * cfg.gradient_accumulation_steps * cfg.num_workers,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our AdamW, so CPU runs need no compiled DeepSpeed ops
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return out
