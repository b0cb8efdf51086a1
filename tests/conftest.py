"""Session fixtures: one tiny model per family, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rp_ray.models import build_tiny_model, load_tokenizer
from rp_ray.template import get_template

REPO = Path(__file__).resolve().parents[1]
SHARED_HARUHI = REPO.parent / "shared" / "datasets" / "chatharuhi"


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
