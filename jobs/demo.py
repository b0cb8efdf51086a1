"""The main job on the embedded default: tiny model, sample data, local everything.

Builds the tiny llama3 model (unless present), validates and encodes the shipped
ChatHaruhi sample with the llama3 template and prints the data report.
"""

import sys
from pathlib import Path

from rp_ray.cli import run, setup_logging
from rp_ray.config import TrainConfig, load_config
from rp_ray.data.prepare import prepare_data
from rp_ray.models import build_tiny_model

CONFIG = "jobs/configs/tiny_llama3.yaml"


def main() -> None:
    cfg = load_config(TrainConfig, CONFIG, sys.argv[1:])
    if not (Path(cfg.model.path) / "config.json").exists():
        build_tiny_model(cfg.model.template, cfg.model.path)
    prep = prepare_data(cfg.model, cfg.data, Path(cfg.output_dir) / "data")
    print("\n== data report ==")
    print(prep.report.summary())
    print(f"train encoded ({cfg.model.template}, cutoff {cfg.data.cutoff_len}): {prep.train_stats.summary()}")
    print(f"tiny model: {cfg.model.path}\ndata report: {prep.report_path}")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
