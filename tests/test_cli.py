"""The commands a user types: rp-ray and the demo job, including their error paths (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import AUTH, REPO

RP_RAY = str(Path(sys.executable).parent / "rp-ray")


def run(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_tiny_model_command(tmp_path):
    r = run(RP_RAY, "tiny-model", "--family", "gpt_oss", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "tiny gpt_oss model written to" in r.stdout and (tmp_path / "m" / "model.safetensors").is_file()


def test_data_command_reports(tiny_llama3, tmp_path):
    r = run(
        RP_RAY, "data", "--config", "jobs/configs/tiny_llama3.yaml", f"model.path={tiny_llama3}", "--out", str(tmp_path)
    )
    assert r.returncode == 0, r.stderr
    assert "haruhi_train: 300 rows read" in r.stdout and "train encoded: 300 examples" in r.stdout
    assert (tmp_path / "data_report.json").is_file() and (tmp_path / "data_report.txt").is_file()


def test_bad_config_exits_2_with_one_clear_message(tiny_llama3):
    r = run(RP_RAY, "data", "--config", "jobs/configs/tiny_llama3.yaml", "lora.rank=-1")
    assert r.returncode == 2
    assert "lora.rank: got -1" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_says_how_to_build_it():
    r = run(RP_RAY, "data", "--config", "jobs/configs/tiny_llama3.yaml", "model.path=/nonexistent/model")
    assert r.returncode == 2 and "rp-ray tiny-model" in r.stderr and "Traceback" not in r.stderr


def test_config_reference_lists_keys():
    r = run(RP_RAY, "config", "train")
    assert r.returncode == 0 and "deepspeed.stage" in r.stdout and "data.cutoff_len" in r.stdout


@pytest.mark.slow
def test_demo_job_end_to_end(tmp_path, app):
    """`make demo`'s job: builds the tiny model when missing, validates + encodes the sample, prints the report.

    It joins the session's Ray cluster (the one `ray start` recorded), where the session's Serve app runs: the demo
    deploys its own app beside it and removes only that one."""
    model = tmp_path / "tiny"
    # about 3 minutes on 2 idle cores (build, train, eval, serve); the bound leaves room for a busy machine
    # a short pretraining, a few LoRA steps and 20 val rows keep every code path at a fraction of the demo's time
    r = run(
        sys.executable,
        "jobs/demo.py",
        "--pretrain-steps",
        "20",
        "max_steps=6",
        "eval.data.max_samples=20",
        f"model.path={model}",
        f"output_dir={tmp_path / 'out'}",
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr
    assert (model / "config.json").is_file()
    assert "== data report ==" in r.stdout and "kept 300, dropped 0" in r.stdout
    assert (tmp_path / "out" / "data" / "data_report.json").is_file()
    assert (model / "README.md").is_file() and "model card" in r.stdout
    assert "| base |" in r.stdout and "| tiny-lora |" in r.stdout and "empty replies" in r.stdout
    assert "haruhi (fine-tuned adapter)" in r.stdout and "app shut down" in r.stdout
    assert "/rp-ray-demo/v1, OpenAI API" in r.stdout  # beside the session's app at /, under its own prefix
    models = httpx.get(f"{app.url}/v1/models", headers=AUTH, timeout=60)
    assert models.status_code == 200 and "haruhi" in models.text  # the session's app is still there
