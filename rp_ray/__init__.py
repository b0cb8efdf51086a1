"""rp_ray: LoRA fine-tuning, evaluation and serving of role-play chat models on Ray."""

__version__ = "0.1.0"
