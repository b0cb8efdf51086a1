"""The DeepSpeed JSON generated from our config (or the user's own file).

Choices that differ from a plain ZeRO config, and why:

- ``overlap_comm`` is on at stage 3 (DeepSpeed's own stage-3 default): there every forward and backward gathers the
  frozen base weights, the bulk of the traffic, and overlap prefetches them on a side stream instead of stalling
  compute. At stage 2 it stays off: only the LoRA gradients are reduced (a few tens of MB for an 8B model, one bucket),
  so there is nothing to overlap, and overlap would hold 4.5 x ``reduce_bucket_size`` extra. On CPU (gloo) DeepSpeed has
  no streams and the flag is a no-op, so CPU runs use the same JSON as GPU runs.
- bf16 gradients accumulate in fp32 (``data_types.grad_accum_dtype``): summing 8 or more micro-batches in bf16 (8 bits
  of mantissa) loses the small ones. DeepSpeed supports that mix with ZeRO (stage 1 and up) only; at stage 0 it refuses
  it, so there bf16 accumulates in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rp_ray.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """ZeRO stage, offload, batch sizes, clipping and precision as DeepSpeed expects them.

    A user file (``deepspeed.config_file``) replaces the generated dict, but batch sizes, clipping and precision are
    always set from our config so they cannot disagree with the loop; its own ``data_types`` are kept.
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
            zero |= {"overlap_comm": ds.stage == 3, "contiguous_gradients": True, "reduce_bucket_size": 5e7}
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
    if bf16 and out.get("zero_optimization", {}).get("stage", 0) >= 1 and "data_types" not in out:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out
