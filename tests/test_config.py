"""Configs: every YAML in the repo validates; bad values fail early naming the key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from rp_ray.config import (
    ConfigError,
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
    describe,
    load_config,
)

KIND_BY_DIR = {"jobs/configs": TrainConfig}  # serve_configs: tests/test_serve.py


def repo_configs():
    for d, cls in KIND_BY_DIR.items():
        for p in sorted((REPO / d).glob("*.yaml")):
            # eval configs live beside train configs and say so in their name
            yield pytest.param(p, EvalConfig if p.stem.startswith("eval_") else cls, id=str(p.relative_to(REPO)))


@pytest.mark.parametrize("path, cls", list(repo_configs()))
def test_repo_config_validates(path: Path, cls):
    cfg = load_config(cls, path)
    assert cls.model_validate(cfg.model_dump()) == cfg  # survives a Ray process boundary


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/tiny_llama3.yaml",
        ["lora.rank=16", "data.train=[a, b]", "optim.learning_rate=2e-4"],
    )
    assert cfg.lora.rank == 16 and cfg.data.train == ["a", "b"] and cfg.optim.learning_rate == 2e-4


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["lora.rank=0"], "lora.rank: got 0; Input should be greater than or equal to 1"),
        (["model.template=qwen"], "model.template: got 'qwen'; Input should be 'llama3' or 'gpt_oss'"),
        (["lora.rnak=4"], "lora.rnak: unknown key; allowed here: rank, alpha, dropout, target"),
        (["deepspeed.stage=1"], "deepspeed.stage: got 1; Input should be 0, 2 or 3"),
        (["deepspeed.offload_params=true"], "deepspeed.offload_params=true needs deepspeed.stage=3"),
        (["model.enable_thinking=true"], "model.enable_thinking=true only applies to model.template=gpt_oss"),
        (["data.max_drop_ratio=1.5"], "data.max_drop_ratio: got 1.5"),
        (["lora"], "override `lora` is not key=value"),
        (["lora.rank.x=1"], "`rank` is a value, not a section"),
        (["use_gpu=true", "gpus_per_worker=2"], "gpus_per_worker=2: each training worker drives exactly one GPU"),
        (["use_gpu=true", "gpus_per_worker=0.5"], "set gpus_per_worker=1 and num_workers to the number of GPUs"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, REPO / "jobs/configs/tiny_llama3.yaml", overrides)
    assert expected in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="model: required, not given"):
        load_config(TrainConfig, tmp_path / "empty.yaml")


def test_every_field_is_described():
    for cls in (TrainConfig, EvalConfig, ServeConfig, ModelConfig, DeepSpeedConfig):
        lines = describe(cls)
        assert lines and all(not line.rstrip().endswith(":") for line in lines), [
            ln for ln in lines if ln.rstrip().endswith(":")
        ]


def test_max_lora_rank_takes_only_ranks_vllm_runs():
    with pytest.raises(ConfigError, match="max_lora_rank: got 12"):
        load_config(EvalConfig, REPO / "jobs/configs/eval_tiny_llama3.yaml", ["max_lora_rank=12"])
    assert load_config(EvalConfig, REPO / "jobs/configs/eval_tiny_llama3.yaml").max_lora_rank is None


def test_eval_run_names_cannot_become_paths():
    """A run name names its output folder: `../../tmp/pwn` would write outside output_dir."""
    with pytest.raises(ConfigError, match="(?s)adapters.*use letters, digits"):
        load_config(EvalConfig, REPO / "jobs/configs/eval_tiny_llama3.yaml", ["adapters={'../../tmp/pwn': 'x'}"])
    with pytest.raises(ConfigError, match="(?s)adapters.*use letters, digits"):
        load_config(EvalConfig, REPO / "jobs/configs/eval_tiny_llama3.yaml", ['adapters={"ok\\n": x}'])
