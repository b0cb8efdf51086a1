"""The training run's summary: ``training_summary.json``, ``loss.png`` and the warnings a user should see.

A run can finish without error and still have learned nothing (a learning rate
too low, too few steps, a model that cannot fit the data). The loss curve says
so, and the summary says it in words instead of leaving it to a glance at a plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rp_ray.config import TrainConfig

if TYPE_CHECKING:
    from rp_ray.train.state import TrainState

log = logging.getLogger(__name__)

# A run whose loss fell by less than 5% has learned next to nothing: its adapter answers much like the
# base model, or worse (a random-weight tiny model that only learns to end its turn at once moves
# about 2%: 8.34 -> 8.21). The reference is the first step's loss, measured before any update: the
# starting model on real data. The end is the mean of the last tenth of the steps, so one lucky last
# batch cannot hide a flat run. A single batch's loss varies by a few percent, well under the 5% line.
FLAT_LOSS_RATIO = 0.95
LOSS_WINDOW = 0.1


def loss_warnings(history: list[dict[str, Any]]) -> list[str]:
    """Warnings about the loss curve (``[{"step", "loss", ...}]``): empty when the loss fell clearly."""
    losses = [h["loss"] for h in history]
    if len(losses) < 2:
        return [f"only {len(losses)} optimizer step(s): too few to tell whether the model learned anything"]
    k = max(1, round(len(losses) * LOSS_WINDOW))
    first, last = losses[0], sum(losses[-k:]) / k
    if first > 0 and last / first > FLAT_LOSS_RATIO:
        return [
            f"loss barely moved: {first:.4f} -> {last:.4f} (first step -> mean of the last {k} of {len(losses)} steps, "
            f"{1 - last / first:.1%} drop; under {1 - FLAT_LOSS_RATIO:.0%} means the adapter learned little). "
            f"Raise optim.learning_rate or num_epochs / max_steps, or check the data report"
        ]
    return []


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's exponential moving average with its debiasing, for the plot's trend line."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def write_summary(state: TrainState, cfg: TrainConfig, extra: dict[str, Any], out: Path) -> tuple[Path, Path, dict]:
    """training_summary.json and loss.png from the final checkpoint's train state; warnings are logged too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = state.history
    warnings = loss_warnings(hist)
    for w in warnings:
        log.warning("%s", w)
    secs = state.train_seconds
    summary = {
        "steps": state.step,
        "total_steps": state.total_steps,
        "steps_per_epoch": state.steps_per_epoch,
        "tokens": state.tokens,
        "train_seconds": round(secs, 2),
        "tokens_per_s": round(state.tokens / secs, 1) if secs else None,
        "padding_ratio": round(state.padding_ratio, 4),
        "rank_imbalance": round(state.rank_imbalance, 4),  # max over mean tokens per rank, mean of steps
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None,
        "eval_curve": state.eval_history,
        "best_step": state.best_step,
        "best_eval_loss": state.best_loss,
        "warnings": warnings,
        "loss_curve": hist,
        "world_size": state.world_size,
        "starts": state.starts,
        "hardware": state.hardware,
        "peak_memory_gib": round(state.peak_memory_gib, 3),
        "setup_seconds": round(state.setup_seconds, 2),
        "config": cfg.model_dump(),
    } | extra
    summary_path = out / "training_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = [h["step"] for h in hist], [h["loss"] for h in hist]
    ax.plot(steps, losses, lw=1, alpha=0.4, label="train")
    ax.plot(steps, smoothed(losses), lw=1.8, label="train (smoothed)")
    if ev := state.eval_history:
        ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", lw=1.8, label="validation")
    ax.legend()
    title = f"LoRA on {Path(cfg.model.path).name} ({cfg.model.template})"
    ax.set(xlabel="optimizer step", ylabel="loss", title=title + ("\nWARNING: loss barely moved" if warnings else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plot_path = out / "loss.png"
    fig.savefig(plot_path, dpi=100)
    plt.close(fig)
    return summary_path, plot_path, summary
