"""Jobs and the clusters they run on: a job joins only a cluster it was told about (RAY_ADDRESS or `ray start`),
never one that another job's driver started in-process, and a job whose cluster dies under it fails loudly.

Each job here is a real `jobs/train.py` subprocess with its own Ray temp dir, so it sees no cluster the test
session started; the jobs are tiny (2 optimizer steps) but start real Ray clusters, hence `slow`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_ray_processes, ray_env, start_ray_head

from rp_ray.cluster import CLUSTER_LOST_EXIT

BIN = Path(sys.executable).parent
TRAIN = [
    "jobs/train.py",
    "--config",
    "jobs/configs/tiny_llama3.yaml",
    "data.cutoff_len=128",
    "checkpoint_every_steps=100",
    "per_device_batch_size=2",
    "num_workers=1",  # what is under test is the cluster a job runs on, not data parallelism
]


@pytest.mark.slow
def test_two_embedded_jobs_at_once_both_finish(tiny_llama3, tmp_path):
    """Two jobs started together on one machine, with no `ray start` cluster: each starts and keeps its own, and
    neither rides on the other's (which would die with it)."""
    tmps = [tempfile.mkdtemp(prefix="rt", dir="/tmp") for _ in "ab"]
    procs = [
        subprocess.Popen(
            [sys.executable, *TRAIN, f"model.path={tiny_llama3}", f"output_dir={tmp_path / name}", "max_steps=2"],
            cwd=REPO,
            env=ray_env(tmp),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, tmp in zip("ab", tmps)
    ]
    try:
        for name, p in zip("ab", procs):
            out, _ = p.communicate(timeout=1800)
            assert p.returncode == 0, f"job {name}:\n{out[-4000:]}"
            assert "started a private local Ray cluster" in out, out[-2000:]
            assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
            assert (tmp_path / name / "training_summary.json").is_file()
    finally:
        for p, tmp in zip(procs, tmps):
            p.kill()
            kill_ray_processes(tmp)  # whatever the private clusters left behind (agents outlive their raylet)


@pytest.mark.slow
def test_job_whose_cluster_is_killed_exits_non_zero_with_a_clear_message(tiny_llama3, tmp_path):
    """A job on a `ray start` cluster whose processes are all killed mid-run: the job ends with exit code 3 and says
    what happened and how to resume, instead of hanging in ray.get or ending with no output."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = ray_env(ray_tmp)
    start_ray_head(env, 4, "--include-dashboard=false")
    job = subprocess.Popen(
        [
            sys.executable,
            *TRAIN,
            f"model.path={tiny_llama3}",
            f"output_dir={tmp_path}",
            "max_steps=100000",
            "run_name=killed",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        t0 = time.monotonic()
        for line in job.stdout:  # wait until training runs on the joined cluster
            lines.append(line)
            if "step " in line and "loss" in line:
                break
            assert time.monotonic() - t0 < 900, "".join(lines[-50:])
        assert any("joined the Ray cluster" in x for x in lines), "".join(lines[-50:])
    finally:
        kill_ray_processes(ray_tmp, spare=frozenset({job.pid}))  # the job itself must see it and exit
    out, _ = job.communicate(timeout=600)
    text = "".join(lines) + out
    assert job.returncode == CLUSTER_LOST_EXIT, text[-4000:]
    assert "went away while this job was running" in text and "run the same command again" in text, text[-4000:]


def test_each_private_cluster_gets_its_own_haproxy_ports_and_files():
    """Ray's HAProxy defaults are one per machine: two clusters' HAProxies on one machine shared Serve's fallback
    proxy port (8500), and requests meant for one cluster's app were answered by the other's."""
    from rp_ray.cluster import haproxy_env

    tmp = Path(tempfile.mkdtemp(prefix="rph", dir="/tmp"))  # short, as the sockets' paths must be
    a, b = haproxy_env(tmp / "a"), haproxy_env(tmp / "b")
    ports = [
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
    ]
    assert len({env[p] for env in (a, b) for p in ports}) == 2 * len(ports)
    for env, state in ((a, tmp / "a"), (b, tmp / "b")):
        paths = [v for k, v in env.items() if k not in ports]
        assert all(Path(v).is_relative_to(state) for v in paths), paths
        assert state.stat().st_mode & 0o777 == 0o700  # the admin socket inside is its owner's alone
    shutil.rmtree(tmp)


def test_chosen_ports_are_never_ones_the_kernel_hands_out_by_itself():
    """Serve binds HAProxy's stats and fallback ports at the first deploy, minutes after they were chosen: a port
    from the ephemeral range (what binding port 0 gave) was meanwhile taken by another socket in a CI run, and the
    deploy failed with "Address already in use". Chosen ports lie outside that range, once each, and are free."""
    import socket

    from rp_ray.cluster import ephemeral_ports, free_port

    ports = [free_port() for _ in range(200)]
    ephemeral = ephemeral_ports()
    assert not [p for p in ports if p in ephemeral]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free right after it was chosen


def test_two_processes_choosing_ports_at_once_never_choose_the_same():
    """A test session and the job it runs each choose ports they bind later: a port one chose must not be the
    other's choice too while the first lives (1,000 each from about 17,000 ports collide dozens of times by chance
    alone)."""
    import json
    import subprocess
    import sys

    from rp_ray.cluster import free_port

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json; from rp_ray.cluster import free_port; "
            "print(json.dumps([free_port() for _ in range(1000)]), flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = set(json.loads(child.stdout.readline()))
        ours = {free_port() for _ in range(1000)}
    finally:
        child.communicate("\n", timeout=60)
    assert len(theirs) == len(ours) == 1000
    assert not ours & theirs


def test_ensure_ray_gives_its_private_cluster_its_own_haproxy(monkeypatch):
    import os
    from types import SimpleNamespace

    import ray._private.services

    from rp_ray import cluster

    env: dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.pop("RAY_ADDRESS", None)
    seen: list[dict[str, str]] = []
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda _: None)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: seen.append(dict(os.environ)))
    monkeypatch.setattr(cluster.ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(cluster, "start_watchdog", lambda gcs: None)
    cluster.ensure_ray()
    (started,) = seen
    assert started["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] != "8500"
    assert started["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    wrapper = Path(started["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert wrapper.parent == Path(started["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]) and os.access(wrapper, os.X_OK)


def test_serves_haproxy_binds_stats_and_metrics_to_loopback_and_closes_its_socket(tmp_path):
    """Ray's template (as installed) binds the stats page and metrics to every interface and makes the admin socket
    mode 666; the cluster's HAProxy wrapper rewrites exactly those, and real HAProxy accepts the result."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig, get_haproxy_binary
    from ray.serve.config import HTTPOptions

    from rp_ray.cluster import write_haproxy_wrapper

    cfg_file = tmp_path / "haproxy.cfg"
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="0.0.0.0", port=8123),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        stats_port=18404,
        metrics_port=19101,
    )
    HAProxyApi(cfg=cfg, config_file_path=str(cfg_file))._generate_config_file_internal()
    before = cfg_file.read_text()
    assert "bind *:18404" in before and "bind :19101" in before and " mode 666 " in before  # what Ray writes
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    fake.chmod(0o700)
    run = subprocess.run([write_haproxy_wrapper(tmp_path / "wrapper", str(fake)), "-db", "-f", str(cfg_file), "-dR"])
    assert run.returncode == 0 and (tmp_path / "args").read_text().split() == ["-db", "-f", str(cfg_file), "-dR"]
    after = cfg_file.read_text()
    assert "bind 127.0.0.1:18404" in after and "bind 127.0.0.1:19101" in after
    assert " mode 600 " in after and " mode 666 " not in after
    assert "bind *:8123" in after  # the Serve frontend keeps the host it was given
    changed = [(x, y) for x, y in zip(before.splitlines(), after.splitlines()) if x != y]
    assert len(changed) == 3 and len(before.splitlines()) == len(after.splitlines()), changed
    check = subprocess.run(
        [write_haproxy_wrapper(tmp_path / "real", get_haproxy_binary()), "-c", "-f", str(cfg_file)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_haproxy_state_folder_too_long_for_its_sockets_is_refused():
    """HAProxy refuses socket paths over 97 characters and Serve adds the node id (56) under the folder: a long
    folder would fail only when Serve starts, with the error in a proxy actor's log."""
    from rp_ray.cluster import haproxy_env

    with pytest.raises(ValueError, match="too long"):
        haproxy_env(Path("/tmp") / ("x" * 40))


def test_a_machine_without_haproxy_still_gets_its_own_ports(monkeypatch):
    """Training jobs start private clusters too: no HAProxy binary (Serve's HAProxy mode unused) is no error."""
    import ray.serve._private.haproxy as serve_haproxy

    from rp_ray.cluster import haproxy_env

    def missing():
        raise FileNotFoundError("Could not find an HAProxy binary.")

    monkeypatch.setattr(serve_haproxy, "get_haproxy_binary", missing)
    tmp = Path(tempfile.mkdtemp(prefix="rph", dir="/tmp"))
    env = haproxy_env(tmp / "a")
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in env and env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]
    shutil.rmtree(tmp)
