"""Fine-tune a LoRA adapter on Ray Train (DeepSpeed + peft).

    python jobs/train.py --config jobs/configs/tiny_llama3.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny_llama3.yaml

Joins the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray.
"""

import argparse
import sys

from rp_ray.cli import run, setup_logging
from rp_ray.config import TrainConfig, load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TrainConfig YAML (list keys: rp-ray config train)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=10 deepspeed.stage=3")
    a = ap.parse_args()
    cfg = load_config(TrainConfig, a.config, a.overrides)
    from rp_ray.train import run_training

    res = run_training(cfg)
    s = res.summary
    print(f"trained {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
          f"{s['tokens_per_s']} tok/s, padding {s['padding_ratio']:.1%}")
    print(f"adapter: {res.adapter_dir}\nsummary: {res.summary_path}\nloss plot: {res.plot_path}")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
