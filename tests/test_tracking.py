"""Experiment tracking (report_to): what TensorBoard and MLflow hold after a run, read back with their own readers;
a failing tracker never reaches training; no trackers = no files."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from rp_ray.config import TrainConfig, load_config
from rp_ray.train.tracking import (
    MLFLOW_PARAM_MAX_CHARS,
    Backend,
    TensorBoardBackend,
    Tracker,
    TrackerError,
    flat_config,
    param_value,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = {1: (2.5, 1e-4), 2: (2.0, 2e-4), 3: (1.5, 3e-4)}  # step: (train/loss, train/lr)
EVAL = {2: 2.25}  # step: eval/loss


def _cfg(out: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "jobs/configs/tiny_llama3.yaml", [f"output_dir={out}", *overrides])


def _outputs(tmp_path: Path) -> tuple[Path, Path]:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    summary = tmp_path / "train_summary.json"
    summary.write_text('{"steps": 3}')
    return adapter, summary


def _log_run(tracker: Tracker) -> None:
    for step, (loss, lr) in TRAIN.items():
        tracker.log_metrics({"train/loss": loss, "train/lr": lr}, step=step)
        if step in EVAL:
            tracker.log_metrics({"eval/loss": EVAL[step]}, step=step)


def _tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_scalars_and_the_config(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker.start(_cfg(out, "report_to=[tensorboard]", "lora.rank=8"))
    assert tracker.names == ("tensorboard",)
    _log_run(tracker)
    tracker.finish(artifacts=_outputs(tmp_path))
    tracker.finish()  # a second call does nothing

    run_dir = out / "runs" / "train"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    scalars = _tb_scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([loss for loss, _ in TRAIN.values()])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([lr for _, lr in TRAIN.values()])
    assert scalars["eval/loss"] == [(2, pytest.approx(2.25))]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    text = next(t for t in acc.Tags()["tensors"] if t.startswith("config"))
    config_text = acc.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert "rank: 8" in config_text and "- tensorboard" in config_text
    # the HParams dashboard's records: the experiment, this run's hparams, and its end (finished, not failed)
    assert set(acc.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }


def test_tensorboard_resumed_run_hides_the_interrupted_attempts_later_steps(tmp_path):
    cfg = _cfg(tmp_path / "run", "report_to=[tensorboard]", "run_name=r1")
    first = Tracker.start(cfg)
    _log_run(first)
    first.finish(failed=True)
    second = Tracker.start(cfg, resumed_at=2)  # restarted from the checkpoint of step 2
    second.log_metrics({"train/loss": 9.0}, step=2)
    second.log_metrics({"train/loss": 8.0}, step=3)
    second.finish()
    scalars = _tb_scalars(tmp_path / "run" / "runs" / "r1")
    assert scalars["train/loss"] == [(1, 2.5), (2, 9.0), (3, 8.0)]


def test_mlflow_run_holds_params_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is not installed")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "tiny-run"
    cfg = _cfg(out, "report_to=[tensorboard, mlflow]", "lora.rank=16")
    tracker = Tracker.start(cfg)
    assert tracker.names == ("tensorboard", "mlflow")
    _log_run(tracker)
    adapter, summary = _outputs(tmp_path)
    tracker.finish(artifacts=[adapter, summary, tmp_path / "missing.png"])

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    exp = client.get_experiment_by_name("rp_ray")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora.rank"] == "16" and params["data.train"] == json.dumps(cfg.data.train)
    assert params["report_to"] == '["tensorboard", "mlflow"]' and params["tracking_uri"] == "None"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, loss) for s, (loss, _) in TRAIN.items()]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [(2, 2.25)]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert top == {"adapter", "train_summary.json", "config.json"}
    inside = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert inside == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    # both trackers wrote: the TensorBoard run sits beside the MLflow store
    assert _tb_scalars(out / "runs" / "train")["eval/loss"] == [(2, 2.25)]


def test_mlflow_continues_an_unfinished_run_of_the_same_output_dir(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is not installed")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path / "run", "report_to=[mlflow]")
    crashed = Tracker.start(cfg)
    crashed.log_metrics({"train/loss": 3.0}, step=1)  # no finish: the worker died
    resumed = Tracker.start(cfg)
    resumed.log_metrics({"train/loss": 2.0}, step=2)
    resumed.finish()
    fresh = Tracker.start(cfg.model_copy(update={"resume": False}))  # resume=false starts over: a new run
    fresh.finish()

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("rp_ray").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2 and [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [
        (1, 3.0),
        (2, 2.0),
    ]


def test_mlflow_params_are_dotted_and_within_mlflows_limit(tmp_path):
    cfg = _cfg(tmp_path, "data.train=[" + ", ".join(f"set_{i:04d}" for i in range(800)) + "]")
    flat = flat_config(cfg)
    assert flat["lora.rank"] == cfg.lora.rank and flat["optim.learning_rate"] == cfg.optim.learning_rate
    assert flat["model.template"] == cfg.model.template and flat["data.train"] == cfg.data.train
    assert not any(isinstance(v, dict) for v in flat.values())
    assert len(param_value(flat["data.train"])) == MLFLOW_PARAM_MAX_CHARS
    assert param_value(None) == "None" and param_value(True) == "True" and param_value("x") == "x"


class _Exploding(Backend):
    """A tracker whose server went away after the first step."""

    name = "exploding"

    def __init__(self):
        self.calls = 0

    def log(self, metrics, step):
        self.calls += 1
        if step >= 2:
            raise ConnectionError("tracking server unreachable")


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, caplog):
    cfg = _cfg(tmp_path / "run", "report_to=[tensorboard]")
    exploding = _Exploding()
    tracker = Tracker([exploding, TensorBoardBackend(cfg)])
    with caplog.at_level(logging.WARNING, logger="rp_ray.train.tracking"):
        _log_run(tracker)  # raises inside at step 2: nothing reaches the caller
        tracker.log_metrics({"train/loss": "n/a", "train/grad_norm": 0.5}, step=4)  # a non-number is dropped
        tracker.finish()
    assert exploding.calls == 2  # steps 1 and 2, then off
    failures = [r for r in caplog.records if "exploding failed" in r.getMessage()]
    assert len(failures) == 1 and "ConnectionError" in failures[0].getMessage()
    assert any("dropped metric train/loss" in r.getMessage() for r in caplog.records)
    scalars = _tb_scalars(tmp_path / "run" / "runs" / "train")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]  # the other tracker kept logging
    assert scalars["train/grad_norm"] == [(4, 0.5)]


def test_no_report_to_gives_a_tracker_that_does_nothing(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker.start(_cfg(out))
    assert tracker.names == () and not tracker
    _log_run(tracker)
    tracker.finish(artifacts=_outputs(tmp_path))
    tracker.finish()
    assert not out.exists()
    with Tracker() as noop:  # what ranks other than 0 can hold
        noop.log_metrics({"train/loss": 1.0}, step=1)


@pytest.mark.parametrize("name", ["wandb", "swanlab", "mlflow"])
def test_a_missing_tracker_package_is_a_clear_error_at_start(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    out = tmp_path / "run"
    with pytest.raises(TrackerError, match=rf"report_to includes {name} .*pip install {name}"):
        Tracker.start(_cfg(out, f"report_to=[tensorboard, {name}]"))
    # the tensorboard tracker started before it was closed again (its writer thread stopped)
    assert (out / "runs" / "train").is_dir()
