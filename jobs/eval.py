"""Predict the val set with the base model and/or LoRA adapters and score it like LLaMA-Factory.

    python jobs/eval.py --config jobs/configs/eval_tiny_llama3.yaml [key=value ...]
    ray job submit -- python jobs/eval.py --config jobs/configs/eval_tiny_llama3.yaml

Writes <output_dir>/<run>/generated_predictions.jsonl and predict_results.json per run (predict_samples_per_second
counts prediction only; job_wall_seconds is the whole job), and engines.json (engine start-up, in-flight bound,
rows per actor). Rerunning with the same output_dir resumes: finished shards are not predicted again.
"""

import json
import sys

from rp_ray.cli.main import job_config, run, setup_logging
from rp_ray.config import EvalConfig
from rp_ray.eval import run_eval


def main() -> None:
    cfg = job_config(EvalConfig, __doc__, "sampling.greedy=true adapters.mine=path")
    res = run_eval(cfg)
    for name, r in res.results.items():
        print(f"{name}: {json.dumps(r)}")
        print(f"  -> {res.output_dir / name / 'generated_predictions.jsonl'}")
    print(f"summary: {res.output_dir / 'eval_summary.json'}")
    if (res.output_dir / "engines.json").exists():
        print(f"engines: {res.output_dir / 'engines.json'}")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
