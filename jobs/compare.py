"""Evaluate the base model and one or more adapters on the same val set and sampling, side by side.

    python jobs/compare.py --config jobs/configs/eval_tiny_llama3.yaml [adapters.other=path ...]

Writes comparison.md (table + the 20 samples that changed most per adapter), comparison.json
and comparison.png into output_dir, beside each run's LLaMA-Factory-named outputs.
"""

import sys
from pathlib import Path

from rp_ray.cli.main import job_config, run, setup_logging
from rp_ray.config import EvalConfig
from rp_ray.eval import run_eval
from rp_ray.eval.compare import markdown_table, write_comparison


def main() -> None:
    cfg = job_config(EvalConfig, __doc__, "adapters.other=path")
    cfg.include_base = True
    if not cfg.adapters:
        raise ValueError("compare needs at least one adapter: add adapters.<name>=<adapter dir>")
    res = run_eval(cfg)
    paths = write_comparison(res.output_dir, Path(cfg.model.path).name, res.results)
    print(markdown_table(Path(cfg.model.path).name, res.results))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
