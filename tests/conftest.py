"""Session fixtures: one tiny model per family, built once per test session."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

# Token authentication on for every Ray process the tests start or connect to (dashboard and jobs API stay protected).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# This session's Ray processes (and the jobs it starts) live under a temp dir of their own: the session never joins,
# nor stops, another Ray cluster on the machine, and tears down only its own.
SESSION_RAY_TMP = tempfile.mkdtemp(prefix="rpt", dir="/tmp")
os.environ["RAY_TMPDIR"] = SESSION_RAY_TMP

from rp_ray.cluster import free_port
from rp_ray.models import load_tokenizer, random_lora_adapter
from rp_ray.template import get_template
from rp_ray.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_HARUHI = REPO.parent / "shared" / "datasets" / "chatharuhi"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped cleanly (with the reason) on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter with random non-zero weights (stands in for a trained one)."""
    return random_lora_adapter(model_dir, out, seed=seed)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_tiny_model(
        "llama3", tmp_path_factory.mktemp("tiny-llama3"), corpus_file=REPO / "data/sample/haruhi_train.json"
    )


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory) -> Path:
    return build_tiny_model(
        "gpt_oss", tmp_path_factory.mktemp("tiny-gpt-oss"), corpus_file=REPO / "data/sample/haruhi_train.json"
    )


@pytest.fixture(scope="session")
def llama3_tok(tiny_llama3):
    return load_tokenizer(tiny_llama3, get_template("llama3"))


@pytest.fixture(scope="session")
def gpt_oss_tok(tiny_gpt_oss):
    return load_tokenizer(tiny_gpt_oss, get_template("gpt_oss"))


@pytest.fixture(scope="session", autouse=True)
def _run_from_repo_root():
    """Configs and the registry use repo-relative paths, as the README commands do."""
    import os

    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


def kill_ray_processes(ray_tmp: str) -> int:
    """SIGKILL every process whose command line names ``ray_tmp`` (one Ray cluster's processes; `ray stop` would stop
    every Ray cluster on the machine); returns how many were killed."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def ray_start_args(num_cpus: int) -> list[str]:
    """`ray start --head` with every port free, so it starts beside any other Ray cluster on the machine."""
    ports = {
        flag: free_port()
        for flag in (
            "port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    args = [
        "start",
        "--head",
        *(f"--{k}={v}" for k, v in ports.items()),
        "--dashboard-agent-listen-port=0",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]
    return args


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, started like a user would (`ray start --head`), token auth on."""
    import subprocess
    import sys

    import ray

    bin_dir = Path(sys.executable).parent
    ray_bin = str(bin_dir / "ray")
    dash = free_port()
    # jobs run `python ...` with the cluster's PATH: start it from the project venv, as the README says
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = ray_start_args(6) + [f"--dashboard-port={dash}", "--include-dashboard=true"]
    gcs = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
    subprocess.run([ray_bin, *args], check=True, cwd=REPO, capture_output=True, env=env)
    ray.init(address=f"127.0.0.1:{gcs}")
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    ray.shutdown()
    kill_ray_processes(SESSION_RAY_TMP)
