"""Finished runs: what they measured, and what the plan's own model says they should have taken, folded into the
calibration file.

A training ``output_dir`` holds ``training_summary.json`` (its config, tokens, steps, training and wall seconds); an
evaluation ``output_dir`` holds ``eval_summary.json`` (per run: the job's wall time), ``engines.json`` (per pass:
each engine's start-up, batch bound and requests; prompt and reply tokens; prediction time) and
``<run>/run_config.json`` (model, data, sampling). Each run is re-planned from its own config at the kind's default
efficiencies, on the data it read (so the plan and the calibration share one model of time); measured tokens that
differ from the plan's (a run stopped early, replies longer than the labels) scale the plan's figures.

The hardware kind is what the summary records (``hardware``: a device name), else ``--gpu``, else ``cpu`` for a
run that did not use GPUs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from rp_ray.config import ConfigError, DataConfig, EvalConfig, ModelConfig, SamplingConfig, TrainConfig
from rp_ray.plan.calibration import LOAD_BANDWIDTH, Calibration, defaults, section
from rp_ray.plan.hardware import kind_of_device_name
from rp_ray.plan.tokens import SplitTokens


def _kind(recorded: str | None, gpu: str | None, used_gpu: bool, where: Path) -> str:
    if recorded:
        kind = "cpu" if recorded == "cpu" else kind_of_device_name(recorded)
        if kind:
            return kind
    if gpu:
        return gpu
    if not used_gpu:
        return "cpu"
    raise ConfigError(f"{where}: a GPU run that does not record its GPU; say which with --gpu (e.g. --gpu H800)")


def _defaults_only() -> Calibration:
    return Calibration(path=None)


def observe_train(out_dir: Path, gpu: str | None) -> tuple[str, str, dict[str, Any]]:
    """(kind, section, figures) of a finished training run."""
    from rp_ray.plan.planner import plan_train, rank_weight_bytes
    from rp_ray.plan.report import predicted

    path = out_dir / "training_summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    cfg = TrainConfig.model_validate(summary["config"])
    kind = _kind(summary.get("hardware"), gpu, cfg.use_gpu, path)
    plan = plan_train(cfg, gpu=kind, calibration=_defaults_only())
    # a run that stopped early or resumed from a checkpoint trained part of what the plan covers
    done = float(summary["tokens"]) / plan.tokens_trained if plan.tokens_trained else 1.0
    train_s = float(summary["train_seconds"])
    wall = summary.get("wall_seconds")
    weights = rank_weight_bytes(plan.s.shape, plan.s.dtype_bytes, plan.world, cfg.deepspeed.stage)
    obs = {
        "x_s": plan.busiest_flops * done / plan.worker.peak_flops,
        "x_pair_s": plan.busiest_pair_flops * done / plan.worker.peak_flops,
        "count": plan.total_steps * cfg.gradient_accumulation_steps * done,
        "measured_s": train_s,
        "startup_s": (float(wall) - train_s - weights / LOAD_BANDWIDTH) if wall is not None else None,
        "model": cfg.model.path,
        "tokens": int(summary["tokens"]),
        "planned_tokens": plan.tokens_trained,
        "planned_tensors_gib": round((plan.memory.total - plan.memory.get("runtime reserve")) / 2**30, 3),
        "planned_peak_memory_gib": predicted(plan)["peak_memory_gib"],
        "cpu": not plan.s.hw.gpu,
    }
    if "peak_memory_gib" in summary:
        obs["peak_memory_gib"] = summary["peak_memory_gib"]
    cost = attention_cost(summary.get("loss_curve", []), plan, cfg)
    if cost is not None:
        obs["attention_cost"] = cost
    return kind, section("train", bool(plan.s.shape.experts)), obs


def attention_cost(curve: list[dict[str, Any]], plan, cfg: TrainConfig, min_steps: int = 5) -> float | None:
    """Seconds per attention-score FLOP over seconds per dense FLOP, from one run's own steps: each step's seconds
    regressed on its dense and its attention FLOPs on a rank (the step's rows taken at its mean length: length-grouped
    batches make steps of very different lengths, so the two parts grow apart, dense ~ tokens, attention ~ tokens x
    length). None when the run recorded too few steps, or steps too alike to tell the parts apart. The first step is
    left out (warm-up)."""
    shape, flops = plan.s.shape, plan.flops
    rows = cfg.per_device_batch_size * cfg.gradient_accumulation_steps  # a rank's rows per step
    pts = []
    for h in curve[1:]:
        if "seconds" in h and "tokens" in h and h["tokens"] > 0:
            per_rank = h["tokens"] / cfg.num_workers
            dense = flops.dense_executed * per_rank
            pair = flops.pair_executed * rows * shape.attended_pairs(per_rank / rows)
            pts.append((dense, pair, float(h["seconds"])))
    if len(pts) < min_steps:
        return None
    sdd = sum(d * d for d, _, _ in pts)
    spp = sum(p * p for _, p, _ in pts)
    sdp = sum(d * p for d, p, _ in pts)
    det = sdd * spp - sdp * sdp
    if det <= 1e-4 * sdd * spp:  # the two parts grow together: no telling them apart
        return None
    sdt = sum(d * t for d, _, t in pts)
    spt = sum(p * t for _, p, t in pts)
    a, c = (sdt * spp - spt * sdp) / det, (sdd * spt - sdp * sdt) / det
    if a <= 0 or c <= 0:
        return None
    return round(min(100.0, max(0.5, c / a)), 3)


def _eval_config(run_cfg: dict[str, Any], engines: list[dict[str, Any]], use_gpu: bool, group: dict[str, Any]):
    """The EvalConfig a pass ran with, as far as its files tell (what they do not: defaults, or the pass's own
    records when it has them)."""
    data = DataConfig(
        dataset_dir=run_cfg["dataset_dir"],
        train=[],
        val=run_cfg["val"],
        cutoff_len=run_cfg["cutoff_len"],
        max_samples=run_cfg.get("max_samples"),
        use_sample=run_cfg.get("use_sample", False),
    )
    return EvalConfig(
        model=ModelConfig.model_validate(run_cfg["model"]),
        data=data,
        sampling=SamplingConfig.model_validate(run_cfg["sampling"]),
        backend=run_cfg.get("backend", "vllm"),
        shard_size=run_cfg.get("shard_size", 64),
        num_actors=max(1, len(engines)),
        use_gpu=use_gpu,
        tensor_parallel_size=int(group.get("tensor_parallel_size") or 1),
        cpus_per_actor=int(group.get("cpus_per_actor") or 1),
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _observed_rows(tokens: SplitTokens, reply_tokens: int, runs: int) -> list[tuple[int, int]]:
    """(prompt, reply) tokens of each row, the replies as long as the engines made them (the plan takes the labels'
    lengths): ``reply_tokens`` of ``runs`` runs spread over the rows by their labels."""
    scale = reply_tokens / max(1, tokens.supervised_tokens * runs)
    return [(p, max(0, round(r * scale))) for p, r in zip(tokens.lengths, tokens.supervised)]


def _median_bound(engines: list[dict[str, Any]]) -> int:
    """The batch bound the engines of a pass had, the median one."""
    bounds = sorted(int(e.get("bound") or 1) for e in engines)
    return bounds[len(bounds) // 2]


def _start_gap(engines: list[dict[str, Any]]) -> float:
    """The mean seconds between one engine of a pass being ready and the next."""
    ready = sorted(float(e["ready_s"]) for e in engines)
    return (ready[-1] - ready[0]) / (len(ready) - 1) if len(ready) > 1 else 0.0


def observe_pass(
    out_dir: Path, group_key: str, g: dict[str, Any], gpu: str | None, wall: float
) -> tuple[str, str, dict[str, Any]]:
    """(kind, section, figures) of one prediction pass (``g``: its record in engines.json) of a finished evaluation
    that took ``wall`` seconds."""
    from rp_ray.plan.planner import (
        engine_devices,
        engine_lora_params,
        engine_rates,
        engine_weight_bytes,
        eval_engine_hw,
        prediction_pass,
        setting,
        vllm_lora_rank,
    )
    from rp_ray.plan.tokens import eval_tokens

    group = group_key.split(",")
    run_cfg = _read_json(out_dir / group[0] / "run_config.json")
    kind = _kind(
        g.get("hardware"), gpu, bool(g.get("use_gpu", gpu is not None and gpu != "cpu")), out_dir / "engines.json"
    )
    cfg = _eval_config(run_cfg, g["engines"], kind != "cpu", g)
    s = setting(cfg, kind, None, _defaults_only())
    # X: the pass at the default efficiencies without fixed cost per step (the fit adds that as count x overhead)
    eff = replace(defaults(kind, bool(s.shape.experts)), eval_step_overhead_s=0.0)
    shape, hw, b = s.shape, s.hw, s.dtype_bytes
    tokens = eval_tokens(cfg, shape)
    rows = _observed_rows(tokens, g["reply_tokens"], len(group))
    devices = engine_devices(cfg, hw)
    rates = engine_rates(eval_engine_hw(cfg, hw), eff, devices)
    adapters = [a for n in group if (a := _read_json(out_dir / n / "run_config.json").get("adapter"))]
    lora_n = engine_lora_params(shape, vllm_lora_rank(cfg, adapters, []))
    batch, gap = _median_bound(g["engines"]), _start_gap(g["engines"])
    one = prediction_pass(
        cfg, shape, rates, b, rows, group, batch=batch, lora_params=lora_n, gpu=hw.gpu, start_gap_s=gap
    )
    samples = int(g["requests"])
    obs = {
        "x_s": one.seconds,
        "count": one.busiest_steps,
        "measured_s": float(g["predict_s"]),
        "eval_startup_s": float(g["prep_s"]) - engine_weight_bytes(shape, b, hw, devices) / LOAD_BANDWIDTH,
        "eval_other_s": wall - float(g["prep_s"]) - float(g["predict_s"]) - eff.eval_scoring_s_per_sample * samples,
        "model": cfg.model.path,
        "requests": samples,
        "prompt_tokens": g["prompt_tokens"],
        "planned_prompt_tokens": tokens.tokens * len(group),
        "reply_tokens": g["reply_tokens"],
        "label_tokens": tokens.supervised_tokens * len(group),
    }
    return kind, section("eval", bool(shape.experts)), obs


def observe_eval(out_dir: Path, gpu: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, section, figures) of each prediction pass of a finished evaluation."""
    engines = _read_json(out_dir / "engines.json")
    summary = _read_json(out_dir / "eval_summary.json")
    wall = max((res.get("job_wall_seconds", 0.0) for res in summary.values()), default=0.0)
    return [observe_pass(out_dir, group_key, g, gpu, wall) for group_key, g in engines.items()]


def modelled_seconds(kind: str, sect: str, obs: dict[str, Any], eff) -> float:
    """An observed run's time as the plan models it with efficiencies ``eff`` (``x_s`` is at the kind's defaults)."""
    if sect.startswith("train"):
        pair = obs.get("x_pair_s", 0.0)
        return eff.train_x(obs["x_s"] - pair, pair) / eff.train_hfu + obs["count"] * eff.train_overhead_s
    scale = eff.eval_compute / defaults(kind, sect.endswith("moe")).eval_compute
    return obs["x_s"] / scale + obs["count"] * eff.eval_step_overhead_s


def calibrate(dirs: list[str | Path], path: str | Path | None = None, gpu: str | None = None) -> list[str]:
    """Fold each output dir's runs into the calibration file; returns, in words, what each run measured, what the
    plan said of it before and after, and the fit."""
    calib = Calibration.load(path)
    lines = []
    for d in map(Path, dirs):
        if (d / "training_summary.json").is_file():
            found = [observe_train(d, gpu)]
        elif (d / "engines.json").is_file() and (d / "eval_summary.json").is_file():
            found = observe_eval(d, gpu)
        else:
            raise ConfigError(
                f"{d}: neither a training output_dir (training_summary.json) nor an evaluation output_dir "
                "(engines.json and eval_summary.json); pass the output_dir of a finished run"
            )
        for i, (kind, sect, obs) in enumerate(found):
            moe = sect.endswith("moe")
            before = calib.efficiency(kind, moe)
            key = str(d.resolve()) + (f"#{i}" if len(found) > 1 else "")
            fitted = calib.add(kind, sect, key, obs)
            after = calib.efficiency(kind, moe)
            was, now = modelled_seconds(kind, sect, obs, before), modelled_seconds(kind, sect, obs, after)
            lines.append(
                f"{d} ({kind}, {sect}): measured {obs['measured_s']:.1f} s; the plan said {was:.1f} s before, "
                f"{now:.1f} s now"
            )
            if "peak_memory_gib" in obs:
                planned = obs["planned_peak_memory_gib"]
                lines.append(f"  peak memory: measured {obs['peak_memory_gib']} GiB, planned {planned} GiB")
            fit_text = ", ".join(f"{k}={v}" for k, v in fitted.items() if k != "n_runs")
            lines.append(f"  fit over {fitted['n_runs']} run(s) of {kind} {sect}: {fit_text}")
    saved = calib.save()
    lines.append(f"calibration written to {saved}")
    return lines
