"""Job submission against a real `ray start --head` cluster, with token authentication on."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from conftest import REPO


def test_jobs_api_refuses_requests_without_the_token(ray_cluster):
    req = urllib.request.Request(f"{ray_cluster['dashboard']}/api/jobs/")
    try:
        urllib.request.urlopen(req, timeout=10)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    assert status == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    req.add_header("Authorization", f"Bearer {token}")
    assert urllib.request.urlopen(req, timeout=10).status == 200


def test_ray_job_submit_runs_the_tiny_training(ray_cluster, tiny_llama3, tmp_path):
    """`ray job submit -- python jobs/train.py --config <tiny>` runs to completion and writes the adapter."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    out = tmp_path / "train"
    r = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--",
         "python", "jobs/train.py", "--config", "jobs/configs/tiny_llama3.yaml",
         f"model.path={tiny_llama3}", f"output_dir={out}", "max_steps=2", "data.cutoff_len=256"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    assert f"adapter: {out / 'adapter'}" in r.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "training_summary.json").is_file() and (out / "loss.png").is_file()
