"""Jobs and the clusters they run on: a job joins only a cluster it was told about (RAY_ADDRESS or `ray start`),
never one that another job's driver started in-process, and a job whose cluster dies under it fails loudly.

Each job here is a real `jobs/train.py` subprocess with its own Ray temp dir, so it sees no cluster the test
session started; the jobs are tiny (2 optimizer steps) but start real Ray clusters, hence `slow`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_ray_processes, ray_env, start_ray_head

from rp_ray.cluster import CLUSTER_LOST_EXIT

BIN = Path(sys.executable).parent
TRAIN = [
    "jobs/train.py",
    "--config",
    "jobs/configs/tiny_llama3.yaml",
    "data.cutoff_len=128",
    "checkpoint_every_steps=100",
    "per_device_batch_size=2",
    "num_workers=1",  # what is under test is the cluster a job runs on, not data parallelism
]


@pytest.mark.slow
def test_two_embedded_jobs_at_once_both_finish(tiny_llama3, tmp_path):
    """Two jobs started together on one machine, with no `ray start` cluster: each starts and keeps its own, and
    neither rides on the other's (which would die with it)."""
    tmps = [tempfile.mkdtemp(prefix="rt", dir="/tmp") for _ in "ab"]
    procs = [
        subprocess.Popen(
            [sys.executable, *TRAIN, f"model.path={tiny_llama3}", f"output_dir={tmp_path / name}", "max_steps=2"],
            cwd=REPO,
            env=ray_env(tmp),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, tmp in zip("ab", tmps)
    ]
    try:
        for name, p in zip("ab", procs):
            out, _ = p.communicate(timeout=1800)
            assert p.returncode == 0, f"job {name}:\n{out[-4000:]}"
            assert "started a private local Ray cluster" in out, out[-2000:]
            assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
            assert (tmp_path / name / "training_summary.json").is_file()
    finally:
        for p, tmp in zip(procs, tmps):
            p.kill()
            kill_ray_processes(tmp)  # whatever the private clusters left behind (agents outlive their raylet)


@pytest.mark.slow
def test_job_whose_cluster_is_killed_exits_non_zero_with_a_clear_message(tiny_llama3, tmp_path):
    """A job on a `ray start` cluster whose processes are all killed mid-run: the job ends with exit code 3 and says
    what happened and how to resume, instead of hanging in ray.get or ending with no output."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = ray_env(ray_tmp)
    start_ray_head(env, 4, "--include-dashboard=false")
    job = subprocess.Popen(
        [
            sys.executable,
            *TRAIN,
            f"model.path={tiny_llama3}",
            f"output_dir={tmp_path}",
            "max_steps=100000",
            "run_name=killed",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        t0 = time.monotonic()
        for line in job.stdout:  # wait until training runs on the joined cluster
            lines.append(line)
            if "step " in line and "loss" in line:
                break
            assert time.monotonic() - t0 < 900, "".join(lines[-50:])
        assert any("joined the Ray cluster" in x for x in lines), "".join(lines[-50:])
    finally:
        kill_ray_processes(ray_tmp, spare=frozenset({job.pid}))  # the job itself must see it and exit
    out, _ = job.communicate(timeout=600)
    text = "".join(lines) + out
    assert job.returncode == CLUSTER_LOST_EXIT, text[-4000:]
    assert "went away while this job was running" in text and "run the same command again" in text, text[-4000:]
