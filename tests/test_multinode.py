"""Multi-node, proven on one machine: a head and two worker nodes, each a raylet of its own, as on the real cluster.

What is real here: `ray start --head --num-cpus=0` (a head that runs drivers and zero-CPU actors only: cluster.yaml's
head has no GPU for the work, this one not even a CPU) and two `ray start --address=<head>` worker nodes on this
machine, each with 1 CPU, the custom resource ``rp_worker``, an 80 MB object store, ports of its own and a Ray temp
dir of its own (Ray allows one per node; a worker node uses the head's only when given none), so that one node's
processes can be killed alone, as a lost machine would be. Token auth is on (a token of the cluster's own, see
``conftest.token_env``). Jobs go in through the Jobs API (`ray job submit`, as the README says; the driver runs on
the head, and Ray Train pins its controller to the driver's node), training is the real `jobs/train.py` (Ray Train +
DeepSpeed, gloo between the nodes), checkpoints go to one storage path every node sees (EFS on the real cluster, a
local dir here). Placement is read from Ray's state API (`ray list actors`), liveness from ``ray.nodes()``. Nothing
is mocked; what is simulated is the machines: the nodes share this machine's IP, disk and cores (so Ray Train logs
both workers as local ranks 0 and 1 of "node_rank 0": it groups workers by IP, which changes nothing for gloo).

Placement: the train ScalingConfig uses Ray Train's default PACK strategy; each worker node here has room for one
1-CPU worker and the head none, so the two workers land on the two worker nodes (on nodes with room for both, PACK
would put both on one). What these tests prove is that a job's workers on different raylets train together,
checkpoint to shared storage, and survive the loss of a node.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, alive_nodes, kill_ray_processes, ray_nodes, start_ray_head, token_env, wait_for

from rp_ray.cluster import free_port

pytestmark = pytest.mark.slow  # a 3-node cluster and two training jobs

BIN = Path(sys.executable).parent
WORKER_RESOURCE = "rp_worker"
OBJECT_STORE_BYTES = 80 * 1000**2
PORTS_PER_NODE = 100  # --min-worker-port .. --max-worker-port: far more than the few workers a node starts here
# The run: 30 steps so that a node can be killed after the first checkpoint (step 5) with most steps still to go.
# Both runs use the same config (max_failures too); only run_name and output_dir differ.
STEPS, EVERY = 30, 5
TRAIN = [
    "jobs/train.py",
    "--config",
    "jobs/configs/tiny_llama3.yaml",
    "data.cutoff_len=128",
    "per_device_batch_size=2",
    f"max_steps={STEPS}",
    f"checkpoint_every_steps={EVERY}",
    "num_workers=2",
    "max_failures=2",
]


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive TCP ports that are all free now, below Linux's ephemeral range (32768+), where
    :func:`free_port` draws the cluster's other ports, and above Ray's default worker ports (10002-19999)."""
    for _ in range(200):
        base = random.randrange(20000, 32768 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


@dataclass
class WorkerNode:
    name: str
    tmp: str  # its Ray temp dir: everything this node runs has files open there
    node_manager_port: int
    node_id: str = ""


@dataclass
class Cluster:
    env: dict[str, str]
    gcs: str
    dashboard: str
    head_tmp: str
    workers: dict[str, WorkerNode] = field(default_factory=dict)

    def start_worker(self, name: str) -> WorkerNode:
        """`ray start --address=<head>` as one more worker node: 1 CPU, the custom resource, its own ports and temp
        dir; returns once Ray reports it alive (its node id filled in)."""
        tmp = tempfile.mkdtemp(prefix=f"rmn{name}", dir="/tmp")
        node = WorkerNode(name, tmp, free_port())
        self.workers[name] = node
        base = free_port_range(PORTS_PER_NODE)
        args = [
            f"--address={self.gcs}",
            "--num-cpus=1",
            f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--node-manager-port={node.node_manager_port}",
            f"--object-manager-port={free_port()}",
            f"--min-worker-port={base}",
            f"--max-worker-port={base + PORTS_PER_NODE - 1}",
            f"--dashboard-agent-grpc-port={free_port()}",
            "--dashboard-agent-listen-port=0",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ]
        r = subprocess.run(
            [str(BIN / "ray"), "start", *args],
            env=self.env | {"RAY_TMPDIR": tmp},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, f"worker node {name} did not start:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        found = wait_for(
            f"worker node {name} to be alive",
            lambda: [n for n in alive_nodes(self.env, self.gcs) if n["NodeManagerPort"] == node.node_manager_port],
            timeout_s=120,
            poll_s=2,
        )
        node.node_id = found[0]["NodeID"]
        return node

    def kill_worker(self, name: str) -> int:
        """SIGKILL every process of one worker node (raylet, agents, its workers): the machine is gone."""
        return kill_ray_processes(self.workers[name].tmp)

    def names_by_node_id(self) -> dict[str, str]:
        return {n.node_id: n.name for n in self.workers.values()}

    def cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def cluster():
    """The head (no CPUs, dashboard and Jobs API on) and worker nodes w1 and w2, all alive; torn down by their temp
    dirs (never `ray stop`, which would stop every Ray cluster on the machine)."""
    head_tmp = tempfile.mkdtemp(prefix="rmnhead", dir="/tmp")
    env = token_env(head_tmp)
    dash_port = free_port()
    head_ports = free_port_range(PORTS_PER_NODE)
    c = None
    try:
        gcs = start_ray_head(
            env,
            0,
            f"--dashboard-port={dash_port}",
            "--include-dashboard=true",
            f"--object-store-memory={2 * OBJECT_STORE_BYTES}",
            f"--min-worker-port={head_ports}",
            f"--max-worker-port={head_ports + PORTS_PER_NODE - 1}",
        )
        c = Cluster(env, gcs, f"http://127.0.0.1:{dash_port}", head_tmp)
        for name in ("w1", "w2"):
            c.start_worker(name)
        r = c.cli("rp-ray", "wait-jobs", "--address", c.dashboard, "--timeout", "300", timeout=360)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield c
    finally:
        for node in c.workers.values() if c else ():
            kill_ray_processes(node.tmp)
        kill_ray_processes(head_tmp)


def submit(c: Cluster, job_id: str, *args: str) -> None:
    """`ray job submit --no-wait -- python jobs/train.py ...`: the job's driver runs on the head."""
    r = c.cli("ray", "job", "submit", "--address", c.dashboard, "--submission-id", job_id, "--no-wait", "--", "python",
              *args)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def job_state(c: Cluster, job_id: str) -> str | None:
    """'succeeded', 'failed' or 'stopped' once the job ended, else None."""
    r = c.cli("ray", "job", "status", "--address", c.dashboard, job_id)
    m = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", r.stdout + r.stderr)
    return m and m.group(1).removeprefix("was ")


def wait_job(c: Cluster, job_id: str, timeout_s: float = 900) -> str:
    """Wait until the job ends; its logs, after asserting that it succeeded."""
    state = wait_for(f"job {job_id} to end", lambda: job_state(c, job_id), timeout_s, poll_s=3)
    logs = c.cli("ray", "job", "logs", "--address", c.dashboard, job_id).stdout
    assert state == "succeeded", f"job {job_id} {state}:\n{logs[-6000:]}"
    return logs


def train_workers(c: Cluster) -> dict[str, dict]:
    """Every Ray Train worker actor the cluster has had (alive or dead), by actor id, from Ray's state API."""
    r = c.cli(
        "ray", "list", "actors", "--address", c.dashboard, "--filter", "class_name=RayTrainWorker", "--detail",
        "--format", "json", "--limit", "1000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    if r.stdout.strip() == "No resource in the cluster":  # what it prints instead of an empty list
        return {}
    return {a["actor_id"]: a for a in json.loads(r.stdout)}


def attempts(c: Cluster, actors: list[dict]) -> list[list[str]]:
    """The worker nodes (names) of each worker group the run started, in start order: one placement group each."""
    groups: dict[str, list[dict]] = {}
    for a in actors:
        groups.setdefault(a["placement_group_id"], []).append(a)
    names = c.names_by_node_id()
    ordered = sorted(groups.values(), key=lambda g: min(int(a["pid"]) for a in g))
    return [sorted(names.get(a["node_id"], a["node_id"]) for a in g) for g in ordered]


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "training_summary.json").read_text())["loss_curve"]]


def test_head_and_two_worker_nodes_are_three_live_nodes(cluster):
    """ray.nodes(): the head with no CPU and two worker raylets, each with its CPU, custom resource and object store."""
    nodes = alive_nodes(cluster.env, cluster.gcs)
    assert len(nodes) == 3, nodes
    heads = [n for n in nodes if "node:__internal_head__" in n["Resources"]]
    assert len(heads) == 1 and heads[0]["Resources"].get("CPU", 0) == 0, heads
    workers = {n["NodeID"]: n for n in nodes if n is not heads[0]}
    assert set(workers) == {w.node_id for w in cluster.workers.values()}
    for n in workers.values():
        assert n["Resources"]["CPU"] == 1 and n["Resources"][WORKER_RESOURCE] == 1, n
        assert n["Resources"]["object_store_memory"] == OBJECT_STORE_BYTES, n
    assert len({n["NodeManagerPort"] for n in nodes}) == 3  # three raylets, not one node counted thrice


@pytest.fixture(scope="module")
def reference_run(cluster, tiny_llama3, tmp_path_factory):
    """The uninterrupted 2-worker run, submitted to the 3-node cluster: (output dir, storage dir, its worker actors)."""
    work = tmp_path_factory.mktemp("multinode-train")
    storage, out = work / "storage", work / "reference"
    before = set(train_workers(cluster))
    args = [*TRAIN, f"model.path={tiny_llama3}", f"storage_path={storage}", "run_name=reference", f"output_dir={out}"]
    submit(cluster, "train-reference", *args)
    logs = wait_job(cluster, "train-reference")
    assert "joined the Ray cluster" in logs, logs[-3000:]
    actors = [a for i, a in train_workers(cluster).items() if i not in before]
    return out, storage, actors


def test_two_worker_training_places_one_worker_per_node_and_checkpoints_to_shared_storage(cluster, reference_run):
    out, storage, actors = reference_run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert len(summary["loss_curve"]) == STEPS
    assert attempts(cluster, actors) == [["w1", "w2"]]  # one worker group, one worker on each worker node
    # Ray Train's registered checkpoints are in the shared storage path (both ranks wrote their DeepSpeed shards and
    # RNG state there), the last one at the final step
    snap = json.loads((storage / "reference" / "checkpoint_manager_snapshot.json").read_text())
    last = storage / "reference" / snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert json.loads((last / "train_state.json").read_text())["step"] == STEPS
    assert (last / "rng_rank0.pt").is_file() and (last / "rng_rank1.pt").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_training_resumes_on_a_replacement_node_with_the_same_losses(cluster, reference_run, tiny_llama3, tmp_path):
    """Worker node w1 is killed (every process of it) once the first checkpoint is registered; a replacement node w3
    joins; Ray Train restarts the worker group on w2 and w3 from that checkpoint, and every step's loss equals the
    uninterrupted run's."""
    ref_out, storage, _ = reference_run
    out = tmp_path / "resumed"
    before = set(train_workers(cluster))
    args = [*TRAIN, f"model.path={tiny_llama3}", f"storage_path={storage}", "run_name=resumed", f"output_dir={out}"]
    submit(cluster, "train-resumed", *args)

    # Ray Train's own record of the run's checkpoints: a checkpoint is in it once every rank has reported it. A
    # checkpoint directory appearing in storage is not enough: killed then, the run restarts from step 0.
    snapshot = storage / "resumed" / "checkpoint_manager_snapshot.json"
    last_job_check = [time.monotonic()]

    def registered_step() -> int | None:
        """The step of the latest checkpoint Ray Train registered, once there is one."""
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError):  # not written yet, or being written
            latest = None
        if latest:
            return latest["metrics"]["step"]
        if time.monotonic() - last_job_check[0] > 10:  # a job that died early is not waited for
            last_job_check[0] = time.monotonic()
            state = job_state(cluster, "train-resumed")
            assert state is None, (
                f"the job {state} before its first checkpoint:\n"
                + cluster.cli("ray", "job", "logs", "--address", cluster.dashboard, "train-resumed").stdout[-6000:]
            )
        return None

    step = wait_for("the first checkpoint of the run", registered_step, timeout_s=600, poll_s=0.1)
    assert step < STEPS, f"the run finished (step {step}) before a node could be killed"
    assert cluster.kill_worker("w1") > 0
    cluster.start_worker("w3")
    logs = wait_job(cluster, "train-resumed")

    m = re.search(r"resumed from checkpoint at step (\d+)", logs)
    assert m and step <= int(m.group(1)) < STEPS, logs[-6000:]  # from the checkpoint registered before the kill
    actors = [a for i, a in train_workers(cluster).items() if i not in before]
    assert attempts(cluster, actors) == [["w1", "w2"], ["w2", "w3"]]  # first on w1+w2, then on the survivor and w3
    got, want = losses(out), losses(ref_out)
    assert len(got) == STEPS
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    nodes = {n["NodeID"]: n["Alive"] for n in ray_nodes(cluster.env, cluster.gcs)}
    assert nodes[cluster.workers["w1"].node_id] is False and sum(nodes.values()) == 3
