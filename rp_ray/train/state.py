"""A training run's state and its checkpoints: the peft adapter (and the best one so far when validation runs),
DeepSpeed's state without frozen weights (optimizer, scheduler, LoRA parameters), each rank's RNG state and the
``TrainState``, so a restarted worker continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rp_ray.config import TrainConfig
from rp_ray.train.step import adapter_state

ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
DS_DIR = "deepspeed"
STATE_FILE = "train_state.json"


def rng_state() -> dict[str, Any]:
    """Every RNG that dropout and sampling draw from: torch's CPU and (when present) CUDA generators, Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


@dataclass
class TrainState:
    """Where a run is and what it has measured: the part of a checkpoint that is not DeepSpeed's, and what the
    driver's summary is written from. JSON in ``train_state.json``; the same on every rank."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    # {"step", "loss", "lr", "tokens" (all ranks'), "seconds" (the step's own time)} per optimizer step
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "tokens"} per evaluation
    best_step: int | None = None  # step of the lowest validation loss so far
    starts: list[int] = field(default_factory=list)  # the step each attempt started at (0, then resumes)
    steps_per_epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    padding_ratio: float = 0.0
    rank_imbalance: float = 1.0
    hardware: str = ""  # the device rank 0 trained on: the GPU's name, or "cpu"
    peak_memory_gib: float = 0.0  # rank 0: GPU tensors allocated at the peak, or on CPU the process's peak RSS
    setup_seconds: float = 0.0  # the first attempt's worker set-up: model load, DeepSpeed, data, until step 1

    @property
    def best_loss(self) -> float | None:
        return next((e["loss"] for e in self.eval_history if e["step"] == self.best_step), None)

    def add_eval(self, step: int, loss: float, tokens: int) -> bool:
        """Record a validation loss; True when it is the lowest so far."""
        best = self.best_loss
        self.eval_history.append({"step": step, "loss": loss, "tokens": tokens})
        if best is None or loss < best:
            self.best_step = step
            return True
        return False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def peak_memory_gib(device: torch.device) -> float:
    """The peak a plan predicts, measured the same way: GPU tensors at their peak (``max_memory_allocated``), or on
    CPU this process's peak resident set (Linux reports ``ru_maxrss`` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_checkpoint(
    engine, cfg: TrainConfig, rank: int, out: Path, state: TrainState, best: dict[str, torch.Tensor] | None
) -> None:
    """Every rank writes its DeepSpeed shard and RNG; rank 0 adds the adapter, the best adapter so far (when
    validation runs) and the train state."""
    adapter = adapter_state(engine, cfg.deepspeed.stage)
    engine.save_checkpoint(str(out / DS_DIR), tag="state", exclude_frozen_parameters=True)
    torch.save(rng_state(), out / f"rng_rank{rank}.pt")
    if rank == 0:
        engine.module.save_pretrained(out / ADAPTER_DIR, state_dict=adapter, safe_serialization=True)
        if best is not None:
            engine.module.save_pretrained(out / BEST_ADAPTER_DIR, state_dict=best, safe_serialization=True)
        (out / STATE_FILE).write_text(state.to_json())


def restore_checkpoint(engine, rank: int, ckpt_dir: Path) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """The train state and (on rank 0) the best adapter so far, after DeepSpeed and the RNGs are restored."""
    from safetensors.torch import load_file

    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag="state", load_module_strict=False)
    set_rng_state(torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=True))
    best_file = ckpt_dir / BEST_ADAPTER_DIR / "adapter_model.safetensors"
    best = load_file(best_file) if rank == 0 and best_file.is_file() else None
    return TrainState.from_json((ckpt_dir / STATE_FILE).read_text()), best
