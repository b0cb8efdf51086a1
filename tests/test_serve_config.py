"""The shipped serve configs and the deployment options they give, without Ray running: every config passes Ray's
schema and ours, the GPU engines are sized from their vLLM batch, and the defaults in code merge under a config's
`deployments:` as `serve run` merges them."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from ray.serve.schema import ServeDeploySchema

from rp_ray.character.card import rp_settings
from rp_ray.character.catalog import check_characters as check_cards
from rp_ray.character.catalog import load_characters_file as load_cards
from rp_ray.config import ConfigError, ServeConfig
from rp_ray.serve.deployments import (
    APP_IMPORT_PATH,
    DEPLOYMENT_DEFAULTS,
    ENGINE_TARGET_SHARE,
    deployment_overrides,
    load_serve_config,
    merged_options,
)

CONFIGS = sorted(p for p in (REPO / "serve_configs").glob("*.yaml") if not p.name.startswith("characters"))


def _app(path):
    (appl,) = load_serve_config(path).applications
    return appl


def test_repo_serve_configs_pass_rays_schema_and_ours():
    assert {p.stem for p in CONFIGS} >= {"tiny_llama3", "llama31_8b", "gpt_oss_20b"}
    for p in CONFIGS:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        schema = ServeDeploySchema.model_validate(raw)
        (appl,) = schema.applications
        assert appl.import_path == "rp_ray.serve.app:build_app" == APP_IMPORT_PATH
        cfg = ServeConfig.model_validate(appl.args)
        # what each deployment runs with: the defaults in code, the config's entries over them
        options = merged_options(deployment_overrides(appl))
        assert set(options) == {"ChatServer"}
        for name, opts in options.items():
            assert "max_ongoing_requests" in opts and "max_queued_requests" in opts, (p.name, name)
            assert opts["max_queued_requests"] > 0, (p.name, name)  # bounded: a full queue answers 503
        # the cards each config serves (the GPU ones are copied to shared storage) speak through its adapters
        cards = load_cards(REPO / "serve_configs" / ("characters_gpu.yaml" if cfg.use_gpu else "characters.yaml"))
        assert {rp_settings(c).adapter for c in cards.values()} - {None} <= set(cfg.adapters), p.name
        check_cards(cards, served_adapters=cfg.adapters, reserved={cfg.base_name})
        if cfg.use_gpu:
            eng = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "ChatServer")
            assert eng["ray_actor_options"]["num_gpus"] == cfg.tensor_parallel_size
            assert eng["autoscaling_config"]["max_replicas"] > eng["autoscaling_config"]["min_replicas"]


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if ServeConfig.model_validate(_app(p).args).use_gpu], ids=lambda p: p.stem
)
def test_gpu_engine_concurrency_follows_from_max_num_seqs(path):
    """A GPU engine replica admits what one vLLM batch holds and autoscales at 3/4 of it."""
    appl = _app(path)
    cfg = ServeConfig.model_validate(appl.args)
    assert cfg.max_num_seqs is not None, f"{path.name}: set max_num_seqs; the engine's concurrency follows from it"
    engine = merged_options(deployment_overrides(appl))["ChatServer"]
    want = {
        "max_ongoing_requests": cfg.max_num_seqs,
        "target_ongoing_requests": max(1, round(ENGINE_TARGET_SHARE * cfg.max_num_seqs)),
    }
    assert engine["max_ongoing_requests"] == want["max_ongoing_requests"] == cfg.max_num_seqs
    assert engine["autoscaling_config"]["target_ongoing_requests"] == want["target_ongoing_requests"]
    assert want["target_ongoing_requests"] == round(ENGINE_TARGET_SHARE * cfg.max_num_seqs)


def test_tiny_config_runs_the_defaults_so_run_local_deploys_what_serve_run_does():
    """run_local (demo, bench) deploys the defaults; `serve run serve_configs/tiny_llama3.yaml` must add nothing."""
    appl = _app(REPO / "serve_configs" / "tiny_llama3.yaml")
    assert deployment_overrides(appl) == {}
    assert merged_options(deployment_overrides(appl)) == DEPLOYMENT_DEFAULTS


def test_config_options_replace_default_options_whole_as_serve_does():
    merged = merged_options({"ChatServer": {"ray_actor_options": {"num_gpus": 1}, "max_ongoing_requests": 8}})
    engine, defaults = merged["ChatServer"], DEPLOYMENT_DEFAULTS["ChatServer"]
    assert engine["ray_actor_options"] == {"num_gpus": 1}  # not merged key by key: num_cpus is Ray's default again
    assert engine["max_ongoing_requests"] == 8
    assert engine["health_check_timeout_s"] == defaults["health_check_timeout_s"]
    plain = merged_options()
    assert plain == DEPLOYMENT_DEFAULTS
    plain["ChatServer"]["ray_actor_options"]["num_cpus"] = 99
    assert DEPLOYMENT_DEFAULTS["ChatServer"]["ray_actor_options"]["num_cpus"] != 99  # copies, never the table


def test_load_serve_config_replaces_args_keys_and_the_port(tmp_path):
    schema = load_serve_config(
        REPO / "serve_configs" / "tiny_llama3.yaml",
        {"model": {"path": "/m", "template": "llama3"}, "max_n": 2},
        port=1234,
    )
    (appl,) = schema.applications
    assert schema.http_options.port == 1234 and schema.http_options.host == "127.0.0.1"
    assert appl.args["model"] == {"path": "/m", "template": "llama3"} and appl.args["max_n"] == 2
    assert appl.args["adapters"] == {"tiny-lora": "train/tiny-llama3/adapter"}  # the rest is the file's
    raw = yaml.safe_load((REPO / "serve_configs" / "tiny_llama3.yaml").read_text(encoding="utf-8"))
    for change, match in [
        ({"deployments": [{"name": "Nope", "max_ongoing_requests": 1}]}, "'Nope' is not a deployment"),
        ({"deployments": [{"name": "ChatServer", "max_ongoing_requests": 0}]}, "not a valid serve config"),
        ({"import_path": "other:app"}, "import_path 'other:app'"),
        ({"runtime_env": {"pip": ["x"]}}, "runtime_env"),
    ]:
        bad = {**raw, "applications": [{**raw["applications"][0], **change}]}
        with pytest.raises(ConfigError, match=match):
            load_serve_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")
