"""Training throughput of the tiny llama3 model on this machine, with and without length grouping.

Two real runs of jobs/configs/tiny_llama3.yaml (2 Ray Train workers, DeepSpeed ZeRO-2, CPU)
on the shipped sample, same steps and seed; prints non-pad tokens/s of each, the padding
ratio of each batch plan, and the speed-up ratio.

Usage: .venv/bin/python bench/train_throughput.py [--steps 20] [--cutoff-len 1024] [--batch 4]
"""

import argparse
import json
import tempfile
from pathlib import Path

from rp_ray.cli.main import setup_logging
from rp_ray.config import TrainConfig, load_config
from rp_ray.llm.tiny_model import build_tiny_model
from rp_ray.train import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cutoff-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4, help="per-device micro-batch")
    a = ap.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llama3", Path(tmp) / "model")
        results = {}
        for grouped in (False, True):
            cfg = load_config(
                TrainConfig,
                "jobs/configs/tiny_llama3.yaml",
                [
                    f"model.path={model}",
                    f"output_dir={Path(tmp) / str(grouped)}",
                    f"max_steps={a.steps}",
                    f"data.cutoff_len={a.cutoff_len}",
                    f"per_device_batch_size={a.batch}",
                    "gradient_accumulation_steps=1",
                    f"group_by_length={str(grouped).lower()}",
                    "checkpoint_every_steps=1000",
                    "logging_steps=5",
                ],
            )
            results[grouped] = run_training(cfg).summary
    rows = {
        ("grouped" if g else "plain"): {k: s[k] for k in ("tokens_per_s", "padding_ratio", "tokens", "train_seconds")}
        for g, s in results.items()
    }
    print(json.dumps(rows, indent=2))
    ratio = results[True]["tokens_per_s"] / results[False]["tokens_per_s"]
    print(
        f"non-pad tokens/s: plain {results[False]['tokens_per_s']}, length-grouped {results[True]['tokens_per_s']}, "
        f"ratio {ratio:.2f}x (padding {results[False]['padding_ratio']:.1%} -> {results[True]['padding_ratio']:.1%})"
    )


if __name__ == "__main__":
    main()
