"""Refusing a config that cannot run, before anything is scheduled: :func:`check` runs the checks of
``rp_ray.plan.checks`` on a config without reading data (rows taken at ``data.cutoff_len`` unless the encoded lengths
are given), so a job's entry point can call it first; ``rp-ray plan`` runs the same checks on its plan."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from rp_ray.config import ConfigError, EvalConfig, ServeConfig, TrainConfig
from rp_ray.llm.models import resolve_dtype
from rp_ray.plan import memory as mem
from rp_ray.plan import throughput as tp
from rp_ray.plan.calibration import Calibration
from rp_ray.plan.checks import DEFAULT_SUPERVISED_SHARE, micro_batch_problem, zero3_problem
from rp_ray.plan.hardware import DEFAULT_GPU, Hardware, hardware
from rp_ray.plan.planner import (
    EvalPlan,
    TrainPlan,
    engine_at,
    engine_problems,
    largest_micro_batch,
    memory_fixes,
    train_setup,
)
from rp_ray.plan.shapes import model_shape
from rp_ray.plan.tokens import SplitTokens

log = logging.getLogger(__name__)


def check(
    cfg: TrainConfig | EvalConfig | ServeConfig,
    hw: Hardware | str | None = None,
    *,
    gpus_per_node: int = 8,
    lengths: Sequence[int] | None = None,
    supervised_share: float | None = None,
) -> list[str]:
    """Every problem of ``cfg`` on ``hw`` (a table kind or a :class:`Hardware`; None: the config's own device,
    ``H100`` for GPU configs), one message each, empty when none. Reads the model's config.json (and adapters'
    adapter_config.json), no data: training rows are taken at ``data.cutoff_len`` unless ``lengths`` (the encoded
    rows' lengths) are given."""
    if hw is None or isinstance(hw, str):
        hw = hardware(hw or (DEFAULT_GPU if cfg.use_gpu else "cpu"), probe=False)
    shape = model_shape(cfg.model)
    b = 4 if resolve_dtype(cfg.model.dtype, hw.gpu) == "float32" else 2
    out: list[str | None] = []
    if isinstance(cfg, TrainConfig):
        world = cfg.num_workers
        eff = Calibration.load().efficiency(hw.kind, bool(shape.experts))
        setup = train_setup(cfg, shape, b, world, hw, eff)
        seq = max(lengths) if lengths else cfg.data.cutoff_len
        share = supervised_share if supervised_share is not None else DEFAULT_SUPERVISED_SHARE
        m = mem.train_memory(shape, setup, hw, cfg.per_device_batch_size, seq, share)
        alts = memory_fixes(shape, setup, hw, cfg.per_device_batch_size, seq, share) if not m.fits else {}
        largest = largest_micro_batch(shape, setup, hw, seq, share)
        out.append(micro_batch_problem(m, cfg.per_device_batch_size, seq, largest, alts, hw, world))
        if cfg.deepspeed.stage == 3 and hw.gpu:
            mean = (sum(lengths) / len(lengths)) if lengths else cfg.data.cutoff_len / 2
            flops = tp.train_flops(shape, setup.lora_params, cfg.gradient_checkpointing)
            compute = cfg.per_device_batch_size * flops.sequence(mean, shape) / (hw.peak_flops * eff.train_hfu)
            gather = tp.zero3_gather_seconds(shape, b, world, hw, gpus_per_node)
            z2 = mem.train_memory(shape, replace(setup, stage=2), hw, cfg.per_device_batch_size, seq, share)
            out.append(zero3_problem(gather, compute, shape.weight_bytes(b), z2.fits, z2.total))
        return [p for p in out if p]
    return engine_problems(cfg, engine_at(cfg, shape, hw, b, []), shape, hw, gpus_per_node)


def refuse(cfg: TrainConfig | EvalConfig | ServeConfig, hw: Hardware | str | None = None, **kwargs) -> None:
    """:func:`check`, raising one ConfigError with every problem (each line names the key and the fix)."""
    refuse_problems(check(cfg, hw, **kwargs))


def refuse_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("this config cannot run as set:\n" + "\n".join(f"  - {p}" for p in problems))


def job_plan(cfg: TrainConfig | EvalConfig, tokens: SplitTokens | None = None) -> TrainPlan | EvalPlan | None:
    """The plan a train or eval job makes before anything is scheduled: refused (one ConfigError naming every
    problem and its fix) when the config cannot run, else logged as one short block and returned for the summary.

    ``tokens``: the train split as the job encoded it. A ConfigError of the planner's is the job's too; any other
    failure to plan does not stop the job: it logs why it has no plan and goes on without one.
    """
    from rp_ray.plan.planner import plan_eval, plan_train
    from rp_ray.plan.report import short_block

    try:
        plan = plan_train(cfg, tokens=tokens) if isinstance(cfg, TrainConfig) else plan_eval(cfg)
    except ConfigError:  # the config itself cannot run (e.g. fewer rows than one optimizer step): say so now
        raise
    except Exception as e:  # noqa: BLE001 - a plan is advice: one that cannot be made does not stop the job
        log.warning("no plan for this job (%s: %s); running without one", type(e).__name__, e)
        return None
    refuse_problems(plan.problems)
    log.info("%s", short_block(plan))
    return plan
