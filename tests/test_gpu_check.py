"""bench/gpu_check.py: training's own step, the attention paths and the hf eval engine, on a machine without Ray
or vLLM (the GPU machine we are lent has neither).

On CPU the script runs every check at tiny shapes over gloo with `import ray` and `import vllm` made to fail, so a
check that reaches for either fails here before it costs GPU time; the settings each training check reports must be
the ones training derives from the shipped config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from rp_ray.config import TrainConfig, load_config
from rp_ray.llm.models import resolve_attn_implementation

NO_RAY_VLLM = {"PYTHONPATH": str(REPO / "tests" / "fixtures" / "no_ray_vllm")}


def run_check(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_the_blocker_really_blocks_ray_and_vllm():
    for mod in ("ray", "vllm.engine"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, env=NO_RAY_VLLM)
        assert r.returncode != 0 and "blocked: the GPU machine has no Ray or vLLM" in r.stderr


def test_the_training_step_imports_without_ray_or_vllm():
    """What the bench imports of training (the step, batching, the checkpoint state, the DeepSpeed config) needs
    neither Ray nor vLLM."""
    mods = "rp_ray.train.step, rp_ray.train.batching, rp_ray.train.state, rp_ray.train.deepspeed_config, rp_ray.train"
    code = f"import sys, {mods}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=NO_RAY_VLLM, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_every_check_runs_without_ray_or_vllm_and_measures_what_training_runs(tmp_path):
    out = tmp_path / "summary.json"
    r = run_check("--tiny", "--steps", "1", "--out", str(out), "--log", str(tmp_path / "log"), env=NO_RAY_VLLM)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    checks = {c["check"]: c for c in summary["checks"]}
    assert not summary["skipped"] and all("error" not in c for c in checks.values()), checks
    assert set(checks) == {
        "train_llama31_8b",
        "train_gpt_oss_20b_z2",
        "train_gpt_oss_20b_z3",
        "train_llama31_8b_other_ckpt",
        "padding",
        "hf_engine_gpt_oss",
    }
    for name, config, flipped in (
        ("train_llama31_8b", "jobs/configs/llama31_8b_4gpu.yaml", False),
        ("train_llama31_8b_other_ckpt", "jobs/configs/llama31_8b_4gpu.yaml", True),
        ("train_gpt_oss_20b_z2", "jobs/configs/gpt_oss_20b_8gpu.yaml", False),
    ):
        cfg = load_config(TrainConfig, REPO / config)
        s = checks[name]["settings"]
        assert s["gradient_checkpointing"] == (cfg.gradient_checkpointing != flipped)
        assert s["micro_batch"] == cfg.per_device_batch_size
        assert s["lora_rank"] == cfg.lora.rank
        assert s["attn_implementation"] == resolve_attn_implementation(
            cfg.model.template, cfg.model.attn_implementation, use_gpu=False
        )
        assert checks[name]["tokens_per_s_per_gpu"] > 0 and len(checks[name]["micro_batch_s"]) == 2
    assert checks["train_llama31_8b"]["settings"]["zero_stage"] == 2
    assert [checks[f"train_gpt_oss_20b_z{z}"]["settings"]["zero_stage"] for z in (2, 3)] == [2, 3]
    # the same model, data and seed: ZeRO-2 and ZeRO-3 reach the same loss, checkpointing changes nothing
    assert checks["train_gpt_oss_20b_z2"]["loss"] == pytest.approx(checks["train_gpt_oss_20b_z3"]["loss"], rel=1e-4)
    assert checks["train_llama31_8b"]["loss"] == pytest.approx(checks["train_llama31_8b_other_ckpt"]["loss"], rel=1e-5)
    for attn in ("sdpa", "eager"):  # a padded micro-batch's loss is its rows' losses
        assert checks["padding"][attn]["rel_diff"] < 1e-5
    engine = checks["hf_engine_gpt_oss"]
    assert engine["auto"]["attn_implementation"] == resolve_attn_implementation("gpt_oss", "auto", use_gpu=False)
    assert engine["auto"]["errors"] == 0


def test_an_exhausted_budget_skips_checks_and_says_so(tmp_path):
    r = run_check("--tiny", "--budget-s", "1", "--only", "padding,train_llama31_8b", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["checks"] == [] and [s["check"] for s in summary["skipped"]] == ["padding", "train_llama31_8b"]


def test_big_shapes_refuse_to_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = run_check("--only", "train_llama31_8b", timeout=300)
    assert r.returncode != 0 and "no CUDA GPU here" in r.stderr


@pytest.mark.gpu
def test_training_check_runs_over_nccl_on_a_gpu(tmp_path):
    r = run_check("--only", "train_llama31_8b", "--out", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = json.loads((tmp_path / "s.json").read_text())["checks"]
    assert res["settings"]["dtype"] == "bfloat16" and res["peak_memory_gib"] > 0 and res["mfu"] is not None
