"""The main job on the embedded default: tiny model, sample data, local Ray.

1. builds the tiny llama3 model (unless present),
2. validates the shipped ChatHaruhi sample and prints the data report,
3. LoRA-trains the tiny model on it with Ray Train + DeepSpeed (2 CPU workers)
   and prints where the adapter went.

    python jobs/demo.py [key=value ...]     # overrides apply to jobs/configs/tiny_llama3.yaml
"""

import sys
from pathlib import Path

from rp_ray.cli import run, setup_logging
from rp_ray.config import TrainConfig, load_config
from rp_ray.models import build_tiny_model

CONFIG = "jobs/configs/tiny_llama3.yaml"


def main() -> None:
    cfg = load_config(TrainConfig, CONFIG, sys.argv[1:])
    if not (Path(cfg.model.path) / "config.json").exists():
        build_tiny_model(cfg.model.template, cfg.model.path)
    from rp_ray.train import run_training

    res = run_training(cfg)
    s = res.summary
    print("\n== data report ==")
    print(Path(s["data_report"]).with_suffix(".txt").read_text(encoding="utf-8"), end="")
    print("== training ==")
    print(f"{s['steps']} steps on {s['world_size']} workers, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
          f"{s['tokens_per_s']} tok/s, padding {s['padding_ratio']:.1%}, {s['wall_seconds']} s")
    print(f"tiny model: {cfg.model.path}\nadapter: {res.adapter_dir}\nsummary: {res.summary_path}\nloss plot: {res.plot_path}")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
