"""Experiment tracking for a training run, named as LLaMA-Factory's ``report_to``.

Training's rank-0 loop starts one :class:`Tracker` from the run's :class:`~rp_ray.config.TrainConfig`, logs scalars
to it as it goes and finishes it at the end::

    tracker = Tracker.start(cfg)                      # report_to=[] gives a tracker whose calls do nothing
    tracker.log_metrics({"train/loss": 2.3, "train/lr": 1e-4}, step=10)
    tracker.finish(artifacts=[adapter_dir, summary_json])

What each ``report_to`` name writes, and where (``<out>`` is ``output_dir`` made absolute):

``tensorboard``
    Event files in ``<out>/runs/<run_name or 'train'>`` (tensorboardX's ``SummaryWriter``: tensorboardX is already
    installed with Ray Train, so writing needs nothing new; ``tensorboard --logdir <out>/runs`` shows them, the
    ``tensorboard`` package is in the ``tracking`` extra). Scalars under the tags given to ``log_metrics``; the
    config as YAML text (tag ``config``) and as HParams (the flattened keys, e.g. ``lora.rank``). Artifacts are not
    copied (they already lie in ``<out>``).
``mlflow``
    A run named after ``output_dir``'s folder in the experiment ``rp_ray`` (or ``$MLFLOW_EXPERIMENT_NAME``) of
    ``tracking_uri``, by default the file store ``file://<out>/mlruns``: the flattened config as params (values cut
    to MLflow's 6000 characters; the whole config also as the artifact ``config.json``), metrics with their step,
    and at ``finish`` the artifacts (a folder under its own name, a file at the top). With ``resume`` on, an
    unfinished run of the same ``output_dir`` (a crash, a Ray Train restart) is continued instead of a new one.
``wandb``
    ``wandb.init(project="rp_ray" or $WANDB_PROJECT, name=<output_dir's name>, dir=<out>)``: offline (files under
    ``<out>/wandb``, ``wandb sync`` uploads them) unless ``WANDB_API_KEY`` or ``WANDB_MODE`` is set; the config,
    the metrics, and the artifacts as one wandb Artifact at ``finish``. Needs ``pip install wandb``.
``swanlab``
    ``swanlab.init(project="rp_ray", experiment_name=<output_dir's name>, logdir=<out>/swanlog)``: offline unless
    ``SWANLAB_API_KEY`` or ``SWANLAB_MODE`` is set; the config and the metrics (no artifacts). Needs
    ``pip install swanlab``.

Failures: a backend that cannot start (package missing, bad URI) raises :class:`TrackerError` from
``Tracker.start``, before any step runs. Once training runs, tracking never stops it: a backend raising in
``log_metrics`` is logged once as a warning and dropped for the rest of the run, and ``finish`` only warns.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from rp_ray.config import TrainConfig

log = logging.getLogger(__name__)

PROJECT = "rp_ray"  # MLflow experiment, wandb and SwanLab project
MLFLOW_PARAM_MAX_CHARS = 6000  # MLflow refuses longer param values
MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's limit of params in one log_batch call


class TrackerError(RuntimeError):
    """A tracker named in report_to cannot start; the message says which and what to do."""


def flat_config(cfg: TrainConfig | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as ``{"lora.rank": 8, "data.train": ["haruhi_train"], ...}``: nested sections joined with dots."""
    tree = cfg if isinstance(cfg, Mapping) else cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def param_value(value: Any) -> str:
    """A config value as an MLflow param: JSON for lists and mappings, str() otherwise, at most 6000 characters."""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:MLFLOW_PARAM_MAX_CHARS]


def run_name(cfg: TrainConfig) -> str:
    """The run's name in MLflow, wandb and SwanLab: ``output_dir``'s folder name (``train`` for ``.``/``/``)."""
    return Path(cfg.output_dir).resolve().name or "train"


def _require(backend: Backend, module: str):
    """Import ``module`` for ``backend``; a TrackerError saying what to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackerError(
            f"report_to includes {backend.name} but its package is not installed: pip install {backend.package} "
            f"(or remove {backend.name} from report_to)"
        ) from e


def _offline_unless(prefix: str) -> str | None:
    """The mode of a hosted tracker: without an API key its SDK would prompt for a login (and block a Ray worker),
    so the run is kept offline (synced later) unless ``<prefix>_API_KEY`` or ``<prefix>_MODE`` is set."""
    return None if os.environ.get(f"{prefix}_API_KEY") or os.environ.get(f"{prefix}_MODE") else "offline"


class Backend:
    """One tracker. ``log`` and ``finish`` may raise: :class:`Tracker` contains the failure."""

    name = "backend"
    package = ""  # what to install for it (the error when it is missing says so)

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        """Upload ``artifacts`` (existing files and folders) where the backend keeps them, then close the run."""

    def abort(self) -> None:
        """Release what the backend holds after it failed; must not contact a server (it may be the failure)."""


class TensorBoardBackend(Backend):
    name, package = "tensorboard", "tensorboardX"

    def __init__(self, cfg: TrainConfig, resumed_at: int | None = None):
        tbx = _require(self, "tensorboardX")
        hparams = _require(self, "tensorboardX.summary").hparams
        import yaml

        self.logdir = Path(cfg.output_dir).resolve() / "runs" / (cfg.run_name or "train")
        # purge_step: TensorBoard hides what an interrupted attempt logged at or after the step resumed from, so a
        # resumed run's curves have one value per step
        # the suffix: tensorboardX names event files by the second and the host only, and a writer opened in the
        # same second (a quick restart) would overwrite the last one's file; nanoseconds keep them apart, in order
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self.writer = tbx.SummaryWriter(str(self.logdir), purge_step=resumed_at, flush_secs=30, filename_suffix=suffix)
        tree = cfg.model_dump(mode="json")
        # four-space indent: TensorBoard's text plugin renders markdown, this keeps the YAML a code block
        text = "".join(f"    {line}\n" for line in yaml.safe_dump(tree, sort_keys=False).splitlines())
        self.writer.add_text("config", text, global_step=0)
        # HParams: lists as JSON strings (the plugin takes str/number/bool); None values are left out by it.
        # The metric tags link the HParams table to the scalars logged under them.
        hp = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat_config(tree).items()}
        experiment, session_start, self._session_end = hparams(hp, {"train/loss": 0.0, "eval/loss": 0.0})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)
        # written out now, not within flush_secs: a worker killed abruptly (a fault, fail_at_step) keeps its curves
        self.writer.flush()

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        if not failed:  # the HParams table shows the run as completed
            self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()  # stops tensorboardX's writer thread


class MLflowBackend(Backend):
    name, package = "mlflow", "mlflow-skinny"

    def __init__(self, cfg: TrainConfig):
        out = Path(cfg.output_dir).resolve()
        uri = cfg.tracking_uri or (out / "mlruns").as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3.x refuses its file store unless this is set (it steers users to a database, which needs the
            # full mlflow package with SQLAlchemy); the file store is what tracking_uri=None promises.
            # setdefault: an explicit MLFLOW_ALLOW_FILE_STORE=false still wins
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        entities = _require(self, "mlflow.entities")
        self._metric = entities.Metric
        # the client API with an explicit URI, not mlflow.start_run(): no process-wide active run or tracking URI
        # is set, so nothing else in the worker process (Ray's own MLflow hooks, user code) is affected
        self.client = _require(self, "mlflow.tracking").MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
        # the output_dir identifies a training run across restarts; its hash keeps the search filter free of quotes
        key = hashlib.sha1(str(out).encode()).hexdigest()[:16]
        run = self._unfinished_run(experiment_id, key) if cfg.resume else None
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            known = set(run.data.params)
            log.info("mlflow: continuing run %s (%s) of %s", run.info.run_name, run.info.run_id, uri)
        else:
            tags = {"rp_ray.output_dir": str(out), "rp_ray.run_key": key}
            run = self.client.create_run(experiment_id, run_name=run_name(cfg), tags=tags)
            known = set()
            log.info("mlflow: run %s (%s) in %s", run.info.run_name, run.info.run_id, uri)
        self.run_id = run.info.run_id
        # a param, once logged, cannot change: a continued run keeps those it has and adds only new keys
        params = [entities.Param(k, param_value(v)) for k, v in flat_config(cfg).items() if k not in known]
        for i in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_PARAMS_PER_BATCH])
        self.client.log_dict(self.run_id, cfg.model_dump(mode="json"), "config.json")

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name)
            except Exception:  # another run created it meanwhile
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _unfinished_run(self, experiment_id: str, key: str):
        where = f"tags.`rp_ray.run_key` = '{key}'"
        runs = self.client.search_runs([experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1)
        # only the newest: an older unfinished run was superseded by it
        return runs[0] if runs and runs[0].info.status != "FINISHED" else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)  # one write (one request to a server) per call

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        for path in artifacts:
            try:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                else:
                    self.client.log_artifact(self.run_id, str(path))
            except Exception as e:  # one artifact that fails does not keep the run from being closed
                log.warning("mlflow: could not log artifact %s (%s: %s)", path, type(e).__name__, e)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbBackend(Backend):
    name = package = "wandb"

    def __init__(self, cfg: TrainConfig):
        self._wandb = _require(self, "wandb")
        out = Path(cfg.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        self.name_ = run_name(cfg)
        self.run = self._wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=self.name_,
            dir=str(out),
            config=cfg.model_dump(mode="json"),
            mode=_offline_unless("WANDB"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        if artifacts:
            # artifact names allow letters, digits, dashes, underscores and dots
            art = self._wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{self.name_}-outputs"), type="model")
            for path in artifacts:
                (art.add_dir if path.is_dir() else art.add_file)(str(path), name=path.name)
            self.run.log_artifact(art)
        self.run.finish(exit_code=1 if failed else 0)

    def abort(self) -> None:
        self.run.finish(exit_code=1)


class SwanLabBackend(Backend):
    name = package = "swanlab"

    def __init__(self, cfg: TrainConfig):
        self._swanlab = _require(self, "swanlab")
        self.run = self._swanlab.init(
            project=PROJECT,
            experiment_name=run_name(cfg),
            config=cfg.model_dump(mode="json"),
            logdir=str(Path(cfg.output_dir).resolve() / "swanlog"),
            mode=_offline_unless("SWANLAB"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._swanlab.log(dict(metrics), step=step)

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        self.abort()

    def abort(self) -> None:
        self._swanlab.finish()


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TensorBoardBackend, MLflowBackend, WandbBackend, SwanLabBackend)
}


class Tracker:
    """The trackers of one training run; with no backends every call does nothing.

    Thread-safe: calls are serialized. Not picklable: start it in the process that logs (rank 0's worker).
    """

    def __init__(self, backends: Iterable[Backend] = ()):
        self._backends = list(backends)
        self._lock = threading.Lock()
        self._finished = False
        self._warned_values = False

    @classmethod
    def start(cls, cfg: TrainConfig, *, resumed_at: int | None = None) -> Tracker:
        """Start every tracker in ``cfg.report_to`` (imports happen here, only for those named).

        ``resumed_at``: the optimizer step a resumed run continues from (TensorBoard then hides what the interrupted
        attempt logged from that step on). Raises :class:`TrackerError` naming the tracker that cannot start; the
        ones already started are closed first.
        """
        started: list[Backend] = []
        for name in dict.fromkeys(cfg.report_to):  # a name given twice starts once
            try:
                if name not in BACKENDS:
                    raise TrackerError(f"report_to: unknown tracker {name!r}; choose from {', '.join(BACKENDS)}")
                started.append(TensorBoardBackend(cfg, resumed_at) if name == "tensorboard" else BACKENDS[name](cfg))
            except Exception as e:
                _abort_all(started)
                if isinstance(e, TrackerError):
                    raise
                raise TrackerError(f"report_to {name}: could not start ({type(e).__name__}: {e})") from e
        return cls(started)

    @property
    def names(self) -> tuple[str, ...]:
        """The trackers still logging (a failed one is dropped); empty after ``finish``."""
        return () if self._finished else tuple(b.name for b in self._backends)

    def __bool__(self) -> bool:
        return bool(self.names)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at an optimizer step. Never raises: a value that is not a number is dropped, a tracker that
        fails is dropped for the rest of the run (a warning each, once)."""
        if self._finished or not self._backends:
            return
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)  # also takes 0-d tensors and numpy scalars
            except (TypeError, ValueError):
                if not self._warned_values:
                    self._warned_values = True
                    log.warning("tracking: dropped metric %s=%r (not a number); such values are dropped", key, value)
        try:
            step = int(step)
        except (TypeError, ValueError):
            log.warning("tracking: step %r is not an integer; metrics %s not logged", step, sorted(values))
            return
        if not values:
            return
        with self._lock:
            if self._finished:  # finish() ran meanwhile in another thread
                return
            for backend in list(self._backends):
                try:
                    backend.log(values, step)
                except Exception as e:
                    self._backends.remove(backend)
                    msg = "tracking: %s failed at step %s (%s: %s); it is off for the rest of the run, training goes on"
                    log.warning(msg, backend.name, step, type(e).__name__, e)
                    _abort_all([backend])

    def finish(
        self, artifacts: Iterable[str | os.PathLike[str]] = (), *, failed: bool = False, leave_open: Iterable[str] = ()
    ) -> None:
        """Log ``artifacts`` (files or folders; missing ones are skipped with a warning) and close every run, as
        failed when ``failed``; the trackers named in ``leave_open`` are let go without closing their run (MLflow's
        is continued by the next ``start`` with ``resume``, to add artifacts that exist only later). Never raises;
        a second call does nothing."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            keep = set(leave_open)
            self._backends = [b for b in self._backends if b.name not in keep]
            paths = []
            for a in artifacts:
                p = Path(a)
                if p.exists():
                    paths.append(p)
                else:
                    log.warning("tracking: artifact %s does not exist; skipped", p)
            for backend in self._backends:
                try:
                    backend.finish(paths, failed)
                except Exception as e:
                    log.warning("tracking: %s could not finish (%s: %s)", backend.name, type(e).__name__, e)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


def _abort_all(backends: Iterable[Backend]) -> None:
    for backend in backends:
        try:
            backend.abort()
        except Exception:  # already failing: what matters is the error reported by the caller
            log.debug("tracking: %s abort failed", backend.name, exc_info=True)
