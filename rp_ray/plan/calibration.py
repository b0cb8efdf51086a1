"""What jobs achieve, per hardware kind: defaults from published and measured figures, refined by the user's runs.

``rp-ray plan --calibrate OUTPUT_DIR...`` reads finished runs (a training ``output_dir`` with its
``training_summary.json``; an evaluation ``output_dir`` with ``eval_summary.json``, ``engines.json`` and each run's
``run_config.json``), predicts each with the plan's own model of time, and fits per hardware kind and job
(training or evaluation, dense or MoE model):

- training: ``time = X / HFU + micro-batches x overhead`` where ``X`` is the busiest rank's executed FLOPs (attention's
  weighted by its relative cost) over the device's peak, and start-up = wall time - training time (less the weights
  at ``LOAD_BANDWIDTH``);
- evaluation: ``time = X / scale + decode steps x overhead`` where ``X`` is the prediction pass at the default
  efficiencies (the compute efficiency of prefill and the bandwidth efficiency of decode are scaled together: one
  pass's time does not tell them apart), start-up = the first engine's start, and the rest of the job (data checks,
  scoring) per job.

A training run that recorded its steps' tokens and seconds also gives the relative cost of attention's FLOPs (its
steps regressed on their dense and their attention FLOPs: length-grouped batches make steps of very different row
lengths). Runs of one size tell one figure: the efficiency when their time is mostly compute at the defaults, else
(mostly fixed cost per step, as a tiny model's) the overhead, the other keeping its default; runs of different sizes
tell both, by least squares on relative error. Each run's figures are kept in
the file, so folding more runs refits over all of them; a run folded again replaces its old figures. Default location:
``~/.cache/rp_ray/calibration.json`` (``$RP_RAY_CALIBRATION`` or ``--calibration FILE`` elsewhere).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rp_ray.files import write_atomic

CALIBRATION_ENV = "RP_RAY_CALIBRATION"
VERSION = 1
LOAD_BANDWIDTH = 1e9  # bytes/s a job reads weights at from shared storage (assumed)


def default_path() -> Path:
    env = os.environ.get(CALIBRATION_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rp_ray" / "calibration.json"


@dataclass(frozen=True)
class Efficiency:
    """The achieved shares and fixed costs a plan's times use; ``sources`` says where each came from."""

    train_hfu: float  # share of peak FLOP/s reached on executed FLOPs (recomputation included)
    train_overhead_s: float  # per micro-batch, on top of its FLOPs
    train_startup_s: float  # worker group, process group and DeepSpeed set-up, before the weights load
    eval_compute: float  # share of peak FLOP/s in prefill and compute-bound decode steps
    eval_bandwidth: float  # share of memory bandwidth in bandwidth-bound decode steps
    eval_step_overhead_s: float  # per decode step
    eval_startup_s: float  # until the first engine predicts, before its weights load
    eval_other_s: float  # the driver's data checks and Ray start-up
    eval_scoring_s_per_sample: float
    train_worker_runtime_gib: float = 1.0  # a CPU worker's own process (GPU memory plans keep a fixed reserve)
    # seconds an attention-score FLOP takes over a dense-layer one: score matrices of small heads on CPU run far
    # below the dense layers' matmul rate (1: the same rate, as fused attention kernels on GPU)
    train_attention_cost: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    def train_x(self, dense_flops: float, pair_flops: float) -> float:
        """FLOPs as the dense layers' rate counts them: attention's weighted by its relative cost."""
        return dense_flops + self.train_attention_cost * pair_flops


GPU_CHECK = "the GPU check on one H200 (README: GPU check)"


def defaults(kind: str, moe: bool) -> Efficiency:
    """Figures before any calibration. GPU training shares come from this project's GPU check (HFU = its MFU times
    executed over model FLOPs); the rest are stated assumptions until a run of the kind is folded in."""
    if kind == "cpu":
        return Efficiency(
            train_hfu=0.22,
            train_overhead_s=0.0,
            train_startup_s=30.0,
            eval_compute=0.75,
            eval_bandwidth=0.6,
            eval_step_overhead_s=0.04,
            eval_startup_s=20.0,
            eval_other_s=10.0,
            eval_scoring_s_per_sample=0.002,
            sources={
                "train_hfu": "the README's checkpointing bench (65M model, 2 threads, one step)",
                "eval_compute": "the README's eval bench (75% of the measured float32 matmul limit)",
                "eval_startup_s": "the README's eval bench (its first engine's start-up)",
                "eval_step_overhead_s": "bench/plan_accuracy.py --reference: two evaluations with an adapter (the "
                "demo's model and the 65M bench model), fitted together: 41 ms per decode step",
                "*": "assumed",
            },
        )
    hfu, what = (0.147, "gpt-oss-20b, shipped config: 9.8% MFU") if moe else (0.369, "Llama-3.1-8B, shipped: 36.9% MFU")
    return Efficiency(
        train_hfu=hfu,
        train_overhead_s=0.0,
        train_startup_s=60.0,
        eval_compute=0.5,
        eval_bandwidth=0.7,
        eval_step_overhead_s=0.0,
        eval_startup_s=60.0,
        eval_other_s=15.0,
        eval_scoring_s_per_sample=0.002,
        sources={
            "train_hfu": f"{GPU_CHECK}: {what}" + ("" if kind in ("H100", "H200", "H800") else "; same share assumed"),
            "*": "assumed",
        },
    )


def section(job: str, moe: bool) -> str:
    return f"{job}/{'moe' if moe else 'dense'}"


@dataclass
class Calibration:
    """The calibration file: per hardware kind and section, the folded runs and the fit over them."""

    path: Path | None = None
    kinds: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Calibration:
        p = Path(path).expanduser() if path else default_path()
        if not p.is_file():
            return cls(p)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"calibration file {p} is not readable JSON ({e}); delete it or pass --calibration") from e
        if data.get("version") != VERSION:
            raise ValueError(f"calibration file {p} has version {data.get('version')}, expected {VERSION}; refold it")
        return cls(p, data.get("kinds", {}))

    def save(self, path: str | Path | None = None) -> Path:
        p = Path(path).expanduser() if path else (self.path or default_path())
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps({"version": VERSION, "kinds": self.kinds}, indent=2, sort_keys=True))
        self.path = p
        return p

    def efficiency(self, kind: str, moe: bool) -> Efficiency:
        """Defaults with this kind's fitted figures on top."""
        eff = defaults(kind, moe)
        src = dict(eff.sources)
        where = f"calibrated ({self.path})"
        for job in ("train", "eval"):
            fit = self.kinds.get(kind, {}).get(section(job, moe), {}).get("fit", {})
            for key, value in fit.items():
                if key.startswith("n_"):
                    continue
                if job == "eval" and key == "scale":
                    eff = replace(eff, eval_compute=eff.eval_compute * value, eval_bandwidth=eff.eval_bandwidth * value)
                    src["eval_compute"] = src["eval_bandwidth"] = f"{where}, {fit['n_runs']} run(s)"
                else:
                    eff = replace(eff, **{key: value})
                    src[key] = f"{where}, {fit['n_runs']} run(s)"
        return replace(eff, sources=src)

    def add(self, kind: str, sect: str, run: str, obs: dict[str, Any]) -> dict[str, Any]:
        """Record one run's figures (replacing an earlier fold of the same run) and refit the section."""
        entry = self.kinds.setdefault(kind, {}).setdefault(sect, {"runs": {}})
        entry["runs"][run] = obs
        job, moe = sect.split("/")
        entry["fit"] = fit(job, list(entry["runs"].values()), defaults(kind, moe == "moe"))
        return entry["fit"]


def _least_squares(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Minimise sum(((u x + o m) - t) / t)^2 over u > 0, o >= 0 for rows (x, m, t)."""
    a = [(x / t, m / t) for x, m, t in rows]
    sxx = sum(x * x for x, _ in a)
    smm = sum(m * m for _, m in a)
    sxm = sum(x * m for x, m in a)
    sx = sum(x for x, _ in a)
    sm = sum(m for _, m in a)
    det = sxx * smm - sxm * sxm
    if len(rows) >= 2 and det > 1e-12 * max(sxx * smm, 1e-300):
        u = (sx * smm - sm * sxm) / det
        o = (sxx * sm - sxm * sx) / det
        if u > 0 and o >= 0:
            return u, o
    return (sx / sxx if sxx else 0.0), 0.0


def _one_size(
    job: str, rows: list[tuple[float, float, float]], base: Efficiency, fitted: tuple[float, float]
) -> tuple[float, float | None]:
    """(u, overhead or None) from runs of one size, which tell one figure only: the efficiency when their time is
    mostly compute at the defaults, else (most of it fixed cost per step, as a tiny model's) the overhead, the
    efficiency kept at its default."""
    u0 = 1 / base.train_hfu if job == "train" else 1.0  # eval: X is already at the default efficiencies
    o0 = base.train_overhead_s if job == "train" else base.eval_step_overhead_s
    if sum(m * o0 for _, m, _ in rows) <= sum(x * u0 for x, _, _ in rows):
        return fitted[0], None
    return u0, max(0.0, sum((t - x * u0) / m for x, m, t in rows if m) / len(rows))


def fit(job: str, runs: list[dict[str, Any]], base: Efficiency | None = None) -> dict[str, Any]:
    """The section's fitted figures over ``runs`` (see the module docstring); ``base``: the kind's defaults."""
    runs = [r for r in runs if r.get("measured_s", 0) > 0 and r.get("x_s", 0) > 0]
    if not runs:
        return {"n_runs": 0}
    costs = [r["attention_cost"] for r in runs if job == "train" and r.get("attention_cost") is not None]
    cost = sum(costs) / len(costs) if costs else 1.0
    rows = [(r["x_s"] + (cost - 1) * r.get("x_pair_s", 0.0), r["count"], r["measured_s"]) for r in runs]
    u, o = _least_squares(rows)
    out: dict[str, Any] = {"n_runs": len(runs)}
    multi = len({round(r["count"] / r["x_s"], 6) for r in runs}) > 1
    if not multi and base is not None:
        u, o = _one_size(job, rows, base, (u, o))
        multi = o is not None
    if costs:
        out["train_attention_cost"] = round(cost, 3)
    if job == "train":
        out["train_hfu"] = round(1 / u, 4) if u > 0 else None
        if multi:
            out["train_overhead_s"] = round(o, 5)
        starts = [r["startup_s"] for r in runs if r.get("startup_s") is not None]
        if starts:
            out["train_startup_s"] = round(max(0.0, sum(starts) / len(starts)), 1)
        # a CPU worker's peak RSS is its tensors plus the process itself
        rss = [r["peak_memory_gib"] - r["planned_tensors_gib"] for r in runs if r.get("cpu") and "peak_memory_gib" in r]
        if rss:
            out["train_worker_runtime_gib"] = round(max(0.1, sum(rss) / len(rss)), 3)
    else:
        out["scale"] = round(1 / u, 4) if u > 0 else None
        if multi:
            out["eval_step_overhead_s"] = round(o, 6)
        for key in ("eval_startup_s", "eval_other_s"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                out[key] = round(max(0.0, sum(vals) / len(vals)), 1)
    return {k: v for k, v in out.items() if v is not None}
