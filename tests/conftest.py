"""Session fixtures: one tiny model per family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Token authentication on for every Ray process the tests start or connect to (DESIGN.md §5).
os.environ.setdefault("RAY_AUTH_MODE", "token")

from rp_ray.cluster import free_port
from rp_ray.models import load_tokenizer, random_lora_adapter
from rp_ray.tiny_model import build_tiny_model
from rp_ray.template import get_template

REPO = Path(__file__).resolve().parents[1]
SHARED_HARUHI = REPO.parent / "shared" / "datasets" / "chatharuhi"


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter with random non-zero weights (stands in for a trained one)."""
    return random_lora_adapter(model_dir, out, seed=seed)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_tiny_model("llama3", tmp_path_factory.mktemp("tiny-llama3"), corpus_file=REPO / "data/sample/haruhi_train.json")


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory) -> Path:
    return build_tiny_model("gpt_oss", tmp_path_factory.mktemp("tiny-gpt-oss"), corpus_file=REPO / "data/sample/haruhi_train.json")


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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, started like a user would (`ray start --head`), token auth on."""
    import subprocess
    import sys

    import ray

    bin_dir = Path(sys.executable).parent
    ray_bin = str(bin_dir / "ray")
    gcs, dash = free_port(), free_port()
    # jobs run `python ...` with the cluster's PATH: start it from the project venv, as the README says
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=6",
         "--disable-usage-stats", "--include-dashboard=true"],
        check=True, cwd=REPO, capture_output=True, env=env,
    )
    ray.init(address=f"127.0.0.1:{gcs}")
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    ray.shutdown()
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
