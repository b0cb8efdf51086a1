"""How close ``rp-ray plan`` comes to what jobs measure, after calibrating from one run of each kind.

1. Runs the demo (``jobs/demo.py``: its training (a) and its evaluation (c), serving beside the evaluation as the
   demo does) with an empty calibration file, so the plans its jobs print are the uncalibrated defaults.
2. Folds those two runs into a fresh calibration file (``rp-ray plan --calibrate``).
3. Runs, as a user would (``jobs/train.py`` / ``jobs/eval.py`` in their own processes, the calibration file in
   ``RP_RAY_CALIBRATION``), (b) a training run of the eval bench's 65M-parameter llama (vocab 8000, hidden 768,
   10 layers) on the shipped sample and (d) the eval bench's run of ours (``bench/eval_speed.py``'s config: that
   model plus one LoRA adapter, the first 200 rows of the full val split, greedy, 64 new tokens). The plan each
   job printed before it started is in its summary (``predicted``), beside what it measured.
4. Prints, per run, predicted and measured time (the training run: the trainer's wall time; an evaluation: the
   whole job) and, for training, peak memory (CPU: the worker process's peak RSS), with the ratio; (a) and (c) are
   re-planned with the calibration they were folded into.

Usage: .venv/bin/python bench/plan_accuracy.py [--reuse-demo] [--steps 8] [--rows 200] [--max-new-tokens 64]
       .venv/bin/python bench/plan_accuracy.py --reference   # where the CPU default per decode step comes from

Give it the machine to itself: the times it compares are wall-clock times. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rp_ray.config import EvalConfig, TrainConfig, load_config
from rp_ray.llm.models import random_lora_adapter
from rp_ray.llm.tiny_model import build_tiny_model
from rp_ray.plan.calibration import CALIBRATION_ENV, Calibration
from rp_ray.plan.planner import plan_eval, plan_train
from rp_ray.plan.report import predicted
from rp_ray.plan.runs import calibrate

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO_TRAIN = REPO / "outputs/train/tiny-llama3"
DEMO_EVAL = REPO / "outputs/eval/tiny-llama3"
TRAIN_CONFIG = REPO / "jobs/configs/tiny_llama3.yaml"
EVAL_CONFIG = REPO / "jobs/configs/eval_tiny_llama3.yaml"
TIME_BAND, MEMORY_BAND = 0.30, 0.20


def run(cmd: list[str], calibration: Path, log: Path) -> None:
    """``cmd`` in its own process with ``calibration`` as the calibration file; its output to ``log``."""
    env = os.environ | {CALIBRATION_ENV: str(calibration)}
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with log.open("w") as f:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def demo_eval_config() -> EvalConfig:
    """The demo's evaluation (jobs/demo.py): the demo's base model and the adapter its training wrote."""
    cfg = json.loads((DEMO_TRAIN / "training_summary.json").read_text())["config"]
    overrides = [
        f"model.path={cfg['model']['path']}",
        "adapters={}",
        f"adapters.tiny-lora={DEMO_TRAIN / 'adapter'}",
        f"output_dir={DEMO_EVAL}",
    ]
    return load_config(EvalConfig, EVAL_CONFIG, overrides)


def train_row(name: str, summary: dict, pred: dict) -> list[tuple[str, str, float, float, float]]:
    return [
        (name, "time (s)", pred["wall_seconds"], summary["wall_seconds"], TIME_BAND),
        (name, "peak memory (GiB)", pred["peak_memory_gib"], summary["peak_memory_gib"], MEMORY_BAND),
    ]


def eval_row(name: str, results: dict, pred: dict) -> tuple[str, str, float, float, float]:
    measured = max(r["job_wall_seconds"] for r in results.values())
    return (name, "time (s)", pred["job_wall_seconds"], measured, TIME_BAND)


def bench_model() -> tuple[Path, Path]:
    """The eval bench's 65M-parameter llama and its LoRA adapter (built once, cached under outputs/bench)."""
    model = build_tiny_model(
        "llama3", REPO / "outputs/bench/llama3-65m", vocab_size=8000, hidden_size=768, num_layers=10
    )
    adapter = REPO / "outputs/bench/llama3-65m-lora"
    if not (adapter / "adapter_model.safetensors").exists():
        random_lora_adapter(model, adapter, seed=0)
    return model, adapter


def reference(work: Path) -> None:
    """Two short evaluations of very different sizes, base model and one adapter (as evaluations compare them), 40
    full-split val rows, 32 new tokens: the demo's model and its adapter (decode steps mostly fixed cost) and the 65M
    model and its adapter (mostly compute), folded together so that the fit tells vLLM's fixed cost per decode step
    on this CPU from its compute efficiency. Other runs than the ones the accuracy table checks (the demo's adapter
    must exist: run the bench once without --reference first)."""
    model, adapter = bench_model()
    calib_file, none = work / "reference.json", work / "uncalibrated.json"
    calib_file.unlink(missing_ok=True)
    none.unlink(missing_ok=True)
    dirs = []
    demo_adapter = DEMO_TRAIN / "adapter"
    for name, path, lora in (
        ("ref-demo-model", REPO / "outputs/tiny-llama3", demo_adapter),
        ("ref-65m", model, adapter),
    ):
        out = work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        overrides = [
            f"model.path={path}",
            f"output_dir={out}",
            "adapters={}",
            f"adapters.lora={lora}",
            f"data.dataset_dir={REPO / 'data'}",
            "data.use_sample=false",
            "data.max_samples=40",
            "sampling.max_new_tokens=32",
        ]
        run(
            [PY, "jobs/eval.py", "--config", str(EVAL_CONFIG), *overrides],
            work / "uncalibrated.json",
            out.with_suffix(".log"),
        )
        dirs.append(out)
    print("\n".join(calibrate(dirs, calib_file)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse-demo", action="store_true", help="use the demo's outputs already there (step 1 skipped)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of the 65M training run")
    ap.add_argument("--rows", type=int, default=200, help="val rows of the 65M eval (the eval bench's default)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work", default=str(REPO / "outputs/bench/plan_accuracy"))
    ap.add_argument(
        "--reference",
        action="store_true",
        help="instead: the two short evaluations the CPU default of eval_step_overhead_s comes from",
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.reference:
        reference(work)
        return
    uncalibrated, calib_file = work / "uncalibrated.json", work / "calibration.json"
    uncalibrated.unlink(missing_ok=True)
    calib_file.unlink(missing_ok=True)

    if not a.reuse_demo:
        run([PY, "jobs/demo.py", "resume=false"], uncalibrated, work / "demo.log")  # a new run, not a resumed one
    print("\n".join(calibrate([DEMO_TRAIN, DEMO_EVAL], calib_file)))
    calib = Calibration.load(calib_file)

    model, adapter = bench_model()
    train_out, eval_out = work / "train-65m", work / "eval-65m"
    train_overrides = [
        f"model.path={model}",
        f"output_dir={train_out}",
        f"storage_path={work / 'ray_results'}",
        "resume=false",
        f"max_steps={a.steps}",
        "data.cutoff_len=512",
        "per_device_batch_size=2",
        "checkpoint_every_steps=1000",
    ]
    run([PY, "jobs/train.py", "--config", str(TRAIN_CONFIG), *train_overrides], calib_file, work / "train-65m.log")
    eval_overrides = [
        f"model.path={model}",
        f"output_dir={eval_out}",
        "adapters={}",
        f"adapters.tuned={adapter}",
        f"data.dataset_dir={REPO / 'data'}",
        "data.use_sample=false",
        f"data.max_samples={a.rows}",
        "data.cutoff_len=1536",
        f"sampling.max_new_tokens={a.max_new_tokens}",
        f"num_actors={len(os.sched_getaffinity(0))}",
    ]
    if eval_out.exists():
        subprocess.run(["rm", "-rf", str(eval_out)], check=True)
    run([PY, "jobs/eval.py", "--config", str(EVAL_CONFIG), *eval_overrides], calib_file, work / "eval-65m.log")

    demo_train = json.loads((DEMO_TRAIN / "training_summary.json").read_text())
    demo_eval = json.loads((DEMO_EVAL / "eval_summary.json").read_text())
    big_train = json.loads((train_out / "training_summary.json").read_text())
    big_eval = json.loads((eval_out / "eval_summary.json").read_text())
    again_a = predicted(plan_train(TrainConfig.model_validate(demo_train["config"]), calibration=calib))
    again_c = predicted(plan_eval(demo_eval_config(), calibration=calib))
    rows = [
        *train_row("(a) demo training", demo_train, again_a),
        *train_row("(b) 65M training", big_train, big_train["predicted"]),
        eval_row("(c) demo eval", demo_eval, again_c),
        eval_row("(d) 65M eval bench", big_eval, next(iter(big_eval.values()))["predicted"]),
    ]
    before = [
        ("(a) demo training, uncalibrated", demo_train["predicted"]["wall_seconds"], demo_train["wall_seconds"]),
        ("(c) demo eval, uncalibrated", *eval_row("", demo_eval, next(iter(demo_eval.values()))["predicted"])[2:4]),
    ]
    print(f"\ncalibrated from (a) and (c): {calib_file}\n")
    print("| run | quantity | predicted | measured | predicted / measured | within |")
    print("|---|---|---|---|---|---|")
    ok = True
    for name, what, p, m, band in rows:
        inside = abs(p / m - 1) <= band
        ok &= inside
        print(f"| {name} | {what} | {p:.2f} | {m:.2f} | {p / m:.2f} | {'yes' if inside else 'NO'} (±{band:.0%}) |")
    for name, p, m in before:
        print(f"| {name} | time (s) | {p:.2f} | {m:.2f} | {p / m:.2f} | (before calibration) |")
    print(f"\nall within their bands: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
