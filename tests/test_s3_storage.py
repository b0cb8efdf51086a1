"""Training checkpoints on S3: `storage_path: s3://...` as Ray Train takes it, against a real S3-compatible server.

The server is s3rver (installed by `make test` from the npm registry into .cache/s3rver) on loopback; the cluster
is a `ray start` head whose processes carry the S3 credentials, as a cluster's nodes would. A job whose worker dies
mid-run resumes from the checkpoint it wrote to S3 and ends with the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, kill_ray_processes, ray_env, start_ray_head, wait_for

from rp_ray.cluster import free_port
from rp_ray.train.driver import FAIL_AT_STEP_ENV

S3RVER = REPO / ".cache" / "s3rver" / "node_modules" / ".bin" / "s3rver"
BUCKET = "rp-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "S3RVER",  # s3rver's own default credentials
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_REGION": "us-east-1",
    # s3rver stores the SDK's streaming checksums ("aws-chunked" bodies) as they come; AWS itself decodes them
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}
TRAIN = [
    "jobs/train.py",
    "--config",
    "jobs/configs/tiny_llama3.yaml",
    "data.cutoff_len=128",
    "per_device_batch_size=2",
    "max_steps=6",
    "checkpoint_every_steps=2",
    "optim.learning_rate=2e-2",
    "optim.warmup_ratio=0",
]


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory):
    """s3rver with one bucket, and a `ray start` head (4 CPUs) whose environment carries the S3 settings."""
    if not S3RVER.exists():
        pytest.skip("s3rver is not installed: run `make s3rver` (npm)")
    data = tmp_path_factory.mktemp("s3data")
    port = free_port()
    log = (data.parent / "s3rver.log").open("w")  # a file, not a pipe nobody reads: a full pipe stalls the server
    server = subprocess.Popen(
        [str(S3RVER), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--configure-bucket", BUCKET],
        stdout=log,
        stderr=subprocess.STDOUT,
        # s3rver's continuation tokens use a cipher OpenSSL 3 (Node 17+) keeps in its legacy provider
        env=os.environ | {"NODE_OPTIONS": "--openssl-legacy-provider"},
    )
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")
    env = ray_env(ray_tmp) | S3_ENV
    try:
        wait_for("s3rver", lambda: (data / BUCKET).is_dir() or None, timeout_s=120, poll_s=0.5)
        gcs = start_ray_head(env, 4, "--include-dashboard=false")
        yield {"env": env | {"RAY_ADDRESS": gcs}, "port": port, "data": data, "log": data.parent / "s3rver.log"}
    finally:
        kill_ray_processes(ray_tmp)
        server.terminate()
        server.wait(timeout=30)
        log.close()


def train(cluster: dict, out: Path, *overrides: str, env: dict[str, str] | None = None) -> dict:
    r = subprocess.run(
        [sys.executable, *TRAIN, f"output_dir={out}", *overrides],
        cwd=REPO,
        env=cluster["env"] | (env or {}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return json.loads((out / "training_summary.json").read_text())


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_killed_worker_resumes_from_them(s3_cluster, tiny_llama3, tmp_path):
    uri = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{s3_cluster['port']}&scheme=http"
    common = (f"model.path={tiny_llama3}", "max_failures=1")
    ref = train(s3_cluster, tmp_path / "local", *common)
    got = train(s3_cluster, tmp_path / "s3", *common, f"storage_path={uri}", env={FAIL_AT_STEP_ENV: "5"})
    assert got["checkpoint"].startswith(f"{BUCKET}/runs/s3/checkpoint_"), got["checkpoint"]
    # resumed from a checkpoint read back from S3: step 4, or 2 if Ray Train had not yet registered step 4's
    assert len(got["starts"]) == 2 and got["starts"][1] in (2, 4), got["starts"]
    assert [h["loss"] for h in got["loss_curve"]] == pytest.approx([h["loss"] for h in ref["loss_curve"]], rel=1e-6)
    stored = [p for p in (s3_cluster["data"] / BUCKET).rglob("*") if p.is_file()]
    assert any("train_state.json" in str(p) for p in stored), sorted(map(str, stored))[:20]
    assert not (REPO / "s3:").exists()  # the URI was not turned into a local path under the job's directory
