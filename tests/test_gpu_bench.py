"""bench/gpu_train_step.py: the real training step under a plain process group of world size 1 (no Ray, no vLLM).

On CPU it runs its tiny shape over gloo (a smoke run of the very code the GPU numbers come from); with a GPU the
same script runs over NCCL, which the `gpu` test checks (skipped cleanly without CUDA).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def run_bench(*args: str) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "bench/gpu_train_step.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_tiny_shape_runs_the_step_and_reports_throughput():
    (res,) = run_bench("--shape", "tiny", "--stages", "2", "--steps", "2", "--cutoff", "64")
    assert res["zero_stage"] == 2 and res["micro_batch"] == 2 and res["accumulation"] == 2
    assert res["tokens_per_s_per_gpu"] > 0 and res["active_params"] > 0


def test_big_shapes_refuse_to_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run(
        [sys.executable, "bench/gpu_train_step.py", "--shape", "llama31_8b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "no CUDA GPU here" in r.stderr


@pytest.mark.gpu
def test_step_runs_over_nccl_on_a_gpu():
    (res,) = run_bench("--shape", "tiny", "--stages", "3", "--steps", "2", "--cutoff", "256")
    assert res["dtype"] == "torch.bfloat16" and res["peak_memory_gib"] > 0 and res["mfu"] is not None
