"""Fine-tune a LoRA adapter on Ray Train (DeepSpeed + peft).

    python jobs/train.py --config jobs/configs/tiny_llama3.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny_llama3.yaml

Joins the cluster in RAY_ADDRESS (set by `ray job submit`) or the one `ray start` recorded on this machine,
else starts a private local Ray cluster that lives as long as the job.
"""

import sys

from rp_ray.cli.main import job_config, run, setup_logging
from rp_ray.config import TrainConfig
from rp_ray.train import run_training


def main() -> None:
    cfg = job_config(TrainConfig, __doc__, "max_steps=10 deepspeed.stage=3")
    res = run_training(cfg)
    s = res.summary
    print(
        f"trained {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
        f"{s['tokens_per_s']} tok/s, padding {s['padding_ratio']:.1%}"
    )
    print(f"adapter: {res.adapter_dir}\nsummary: {res.summary_path}\nloss plot: {res.plot_path}")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
