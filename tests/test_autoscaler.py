"""Ray's own autoscaler launching and removing cluster.yaml's worker nodes, on one machine.

What is real here: the autoscaler (Ray's monitor process, started by `ray start --head --autoscaling-config=...` as
`ray up` starts it on the real head) with Ray's fake multi-node node provider (``type: fake_multinode``, enabled by
RAY_FAKE_CLUSTER=1), which "launches" a node by starting one more raylet on this machine instead of an EC2 instance,
and terminates it by killing that raylet's processes. The autoscaling config is built from cluster.yaml: its worker
node types (names kept) and top-level settings, with the resources scaled down to one CPU and no GPU per worker, at
most 2 workers, a 12 s idle timeout, and the provider, file mounts and setup commands (AWS, EFS, pip) replaced by
the fake provider's, which runs no commands; the head type takes the fake provider's name. Token auth is on. The work
is a job submitted through the Jobs API (`ray job submit`) that needs CPUs, on a head with none (`--num-cpus=0`), so
only launched workers can run it. Nodes come from ``ray.nodes()``, a node's type from the raylet the provider
started for it.

Not used: ``ray up`` (it would SSH into the "nodes") and ``ray.cluster_utils.AutoscalingCluster`` (it starts its
head inside the test process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, alive_nodes, kill_ray_processes, ray_start_args, token_env, wait_for
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

from rp_ray.cluster import free_port

pytestmark = pytest.mark.slow  # an autoscaling cluster: nodes start and time out

BIN = Path(sys.executable).parent
CLUSTER_YAML = REPO / "cluster.yaml"
MAX_WORKERS = 2
IDLE_TIMEOUT_MIN = 0.2  # 12 s

# The job: four 1-CPU tasks, each holding its CPU a few seconds, on a cluster whose head has no CPU. Each task reports
# the node it ran on and that node's type: the fake provider starts a node's raylet, and so its workers, with the node
# type the autoscaler launched it as in RAY_NODE_TYPE_NAME (what a cloud node's `ray status` line comes from). Then the
# job lists the live nodes, while the launched ones still are.
JOB = """
import json, os, time
import ray

ray.init()

@ray.remote(num_cpus=1)
def work(i):
    time.sleep(4)
    return ray.get_runtime_context().get_node_id(), os.environ.get("RAY_NODE_TYPE_NAME")

ran = ray.get([work.remote(i) for i in range(4)])
alive = [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]
print("RESULT=" + json.dumps({"ran": ran, "alive": alive}))
"""


def autoscaling_config(gcs_address: str) -> dict:
    """cluster.yaml made runnable by the fake provider: its worker node types (names kept), resources scaled down
    to one CPU and no GPU each, at most ``MAX_WORKERS`` workers; its head type with no CPU; its top-level keys kept
    (the monitor reads every one a cluster config has), with nothing in them that would reach AWS or EFS.

    The head type is renamed to the fake provider's: it tags its head node ``ray.head.default`` whatever the config
    says, and an autoscaler whose head type has another name launches a second "head" as a worker."""
    src = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))
    head = src["head_node_type"]
    types = {}
    for name, t in src["available_node_types"].items():
        is_head = name == head
        custom = {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU")}  # none in cluster.yaml today
        types[FAKE_HEAD_NODE_TYPE if is_head else name] = {
            "resources": custom | {"CPU": 0 if is_head else 1},
            "min_workers": 0,
            "max_workers": 0 if is_head else MAX_WORKERS,
            "node_config": {},
        }
    cfg = dict(src)
    cfg.update(
        max_workers=MAX_WORKERS,
        idle_timeout_minutes=IDLE_TIMEOUT_MIN,
        provider={
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # else the fake nodes dial port 6379
        },
        head_node_type=FAKE_HEAD_NODE_TYPE,
        available_node_types=types,
        docker={},
        file_mounts={},
        cluster_synced_files=[],
        initialization_commands=[],
        setup_commands=[],
        head_setup_commands=[],
        worker_setup_commands=[],
        head_start_ray_commands=[],
        worker_start_ray_commands=[],
    )
    return cfg


def worker_types() -> list[str]:
    src = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))
    return [n for n in src["available_node_types"] if n != src["head_node_type"]]


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    """`RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=<cluster.yaml, scaled down>`, with the
    dashboard (Jobs API); torn down by its temp dir, which the fake nodes share."""
    import ray.util

    ray_tmp = tempfile.mkdtemp(prefix="ras", dir="/tmp")
    env = token_env(ray_tmp) | {"RAY_FAKE_CLUSTER": "1"}
    args = ray_start_args(0)
    port = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
    gcs = f"{ray.util.get_node_ip_address()}:{port}"
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs)), encoding="utf-8")
    dash = free_port()
    try:
        r = subprocess.run(
            [str(BIN / "ray"), *args, f"--autoscaling-config={config}", "--include-dashboard=true",
             f"--dashboard-port={dash}"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        c = {"env": env, "gcs": gcs, "dashboard": f"http://127.0.0.1:{dash}"}
        r = cli(c, "rp-ray", "wait-jobs", "--address", c["dashboard"], "--timeout", "300", timeout=360)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield c
    finally:
        kill_ray_processes(ray_tmp)


def cli(c: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=timeout
    )


def test_job_needing_cpus_makes_the_autoscaler_launch_cluster_yaml_workers_then_remove_them(autoscaling_cluster):
    c = autoscaling_cluster
    head = alive_nodes(c["env"], c["gcs"])
    assert len(head) == 1 and head[0]["Resources"].get("CPU", 0) == 0, head  # nothing can run a task yet
    head_id = head[0]["NodeID"]

    r = cli(c, "ray", "job", "submit", "--address", c["dashboard"], "--", "python", "-c", JOB, timeout=600)
    assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT="))[7:])
    ran_on = {node for node, _ in res["ran"]}
    # the work ran on MAX_WORKERS launched nodes, none of them the head, each of a worker type of cluster.yaml
    assert head_id not in ran_on and len(ran_on) == MAX_WORKERS, res
    assert {t for _, t in res["ran"]} <= set(worker_types()), res
    launched = [n for n in res["alive"] if n["id"] != head_id]
    assert {n["id"] for n in launched} == ran_on, res
    for n in launched:  # the node type's resources, scaled down: 1 CPU, no GPU
        assert n["resources"]["CPU"] == 1 and "GPU" not in n["resources"], n

    # idle for IDLE_TIMEOUT_MIN: the autoscaler terminates them again, down to the head alone
    wait_for(
        "the idle workers to be removed",
        lambda: [n["NodeID"] for n in alive_nodes(c["env"], c["gcs"])] == [head_id],
        timeout_s=180,
        poll_s=3,
    )
