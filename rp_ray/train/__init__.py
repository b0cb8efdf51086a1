"""LoRA fine-tuning on Ray Train with DeepSpeed and peft."""

from rp_ray.train.driver import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
