"""The whole workflow as a user runs it against a real local cluster (`ray start --head`, token auth on):

1. `ray job submit -- python jobs/train.py --config jobs/configs/tiny_llama3.yaml ...`  -> an adapter
2. `serve deploy <serve config naming the new adapter>`                              -> the chat app, starting
3. `ray job submit -- python jobs/eval.py --config jobs/configs/eval_tiny_llama3.yaml adapters.tuned=<it>` -> scores
4. `rp-ray chat --model haruhi ...` (the official `openai` client), then `serve shutdown`.

It runs on a `ray start` cluster of its own, not the session's: `serve deploy` makes the deployed config the
cluster's whole Serve state and `serve shutdown` removes every app, which would take the session's shared app away.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, kill_ray_processes, ray_env, start_ray_head

from rp_ray.cluster import free_port

pytestmark = pytest.mark.slow  # train, eval, deploy on a ray start cluster

BIN = Path(sys.executable).parent
RAY_TMP = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # this module's cluster's processes, jobs and logs
ENV = ray_env(RAY_TMP)


@pytest.fixture(scope="module")
def dash():
    """`ray start --head` with a dashboard (the jobs API and `serve deploy` talk to it); its address."""
    port = free_port()
    start_ray_head(ENV, 6, f"--dashboard-port={port}", "--include-dashboard=true")
    yield f"http://127.0.0.1:{port}"
    kill_ray_processes(RAY_TMP)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV
    )
    assert r.returncode == 0, f"{' '.join(args[:4])} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def submit_job(dash: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> -- python <script> <args>`, as the README tells users; it must succeed."""
    r = cli("ray", "job", "submit", "--address", dash, "--", "python", script, *args)
    assert "succeeded" in r.stdout + r.stderr
    return r


def test_train_eval_deploy_chat_on_a_ray_start_cluster(dash, tiny_llama3, tmp_path):
    train_out, eval_out = tmp_path / "train", tmp_path / "eval"

    # 0. what the README tells users to run after `ray start`: wait until the job agent accepts jobs
    r = cli("rp-ray", "wait-jobs", "--address", dash, "--timeout", "600")
    assert "accepts jobs" in r.stdout

    # 1. training job
    r = submit_job(
        dash,
        "jobs/train.py",
        "--config",
        "jobs/configs/tiny_llama3.yaml",
        f"model.path={tiny_llama3}",
        f"output_dir={train_out}",
        "max_steps=4",
        "data.cutoff_len=256",
    )
    adapter = train_out / "adapter"
    assert f"adapter: {adapter}" in r.stdout
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (train_out / "training_summary.json").is_file() and (train_out / "loss.png").is_file()

    # 2. serve deploy: the shipped tiny config, pointed at the new adapter, on a free port. `serve deploy` returns
    # once the config is accepted; the app starts while the evaluation job runs, as a user's would
    key = secrets.token_hex(16)
    (tmp_path / "api_key").write_text(key)
    conf = yaml.safe_load((REPO / "serve_configs/tiny_llama3.yaml").read_text(encoding="utf-8"))
    port = free_port()
    conf["http_options"]["port"] = port
    conf["applications"][0]["args"].update(
        model={"path": str(tiny_llama3), "template": "llama3"},
        adapter_root=str(train_out),
        adapters={"tiny-lora": "adapter"},
        api_key_file=str(tmp_path / "api_key"),
        characters_file=str(REPO / "serve_configs/characters.yaml"),
    )
    deploy = tmp_path / "serve.yaml"
    deploy.write_text(yaml.safe_dump(conf, allow_unicode=True), encoding="utf-8")
    cli("serve", "deploy", "--address", dash, str(deploy))
    try:
        # 3. evaluation job: base vs the new adapter on 20 val rows
        submit_job(
            dash,
            "jobs/eval.py",
            "--config",
            "jobs/configs/eval_tiny_llama3.yaml",
            f"model.path={tiny_llama3}",
            "adapters={}",
            f"adapters.tuned={adapter}",
            f"output_dir={eval_out}",
            "data.max_samples=20",
            "sampling.max_new_tokens=16",
            "shard_size=10",
        )
        for run in ("base", "tuned"):
            res = json.loads((eval_out / run / "predict_results.json").read_text())
            assert res["n_total"] == 20 and res["n_scored"] == 20 and "predict_bleu-4" in res
            assert len((eval_out / run / "generated_predictions.jsonl").read_text().splitlines()) == 20

        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            st = cli("serve", "status", "--address", dash).stdout
            app = (yaml.safe_load(st).get("applications") or {}).get("rp_ray") or {}
            if app.get("status") == "RUNNING":
                break
            assert app.get("status") != "DEPLOY_FAILED", st
            assert time.monotonic() - t0 < 300, f"app not running after 5 minutes:\n{st}"
            time.sleep(3)
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key guards the app

        # 4. chat with the fine-tuned character (rp-ray chat streams through the openai client)
        env = {**ENV, "RP_RAY_API_KEY": key}
        listed = subprocess.run(
            [sys.executable, "-m", "rp_ray.cli.main", "chat", "--base-url", url, "--list"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        assert {line.split("\t")[0] for line in listed.stdout.splitlines()} >= {"base", "tiny-lora", "haruhi"}
        chat = subprocess.run(
            [
                sys.executable,
                "-m",
                "rp_ray.cli.main",
                "chat",
                "--base-url",
                url,
                "--model",
                "haruhi",
                "--temperature",
                "0",
                "--max-tokens",
                "16",
                "阿虚:「早」",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "rp_ray.cli.main", "chat", "--base-url", url, "--model", "nobody", "hi"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "404" in bad.stderr and "does not exist" in bad.stderr
    finally:
        cli("serve", "shutdown", "--address", dash, "--yes")
