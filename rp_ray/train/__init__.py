"""LoRA fine-tuning on Ray Train with DeepSpeed and peft.

The driver (and so Ray) is imported on first use of ``run_training`` / ``TrainResult``: the Ray-free parts
(``batching``, ``worker``'s step, ``deepspeed_config``) import without Ray, as the GPU check needs.
"""

from __future__ import annotations

__all__ = ["TrainResult", "run_training"]


def __getattr__(name: str):
    if name in __all__:
        from rp_ray.train import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
