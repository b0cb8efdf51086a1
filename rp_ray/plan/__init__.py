"""Know before you launch: memory per device, time and cost of a train, eval or serve config, checks that refuse a
config which cannot run, and calibration from the user's own runs (``rp-ray plan``)."""

from __future__ import annotations

from rp_ray.plan.calibration import Calibration, Efficiency, default_path
from rp_ray.plan.hardware import HARDWARE, KINDS, Hardware, hardware, probe_cpu
from rp_ray.plan.planner import EvalPlan, ServePlan, TrainPlan, load_job, make_plan, plan_eval, plan_serve, plan_train
from rp_ray.plan.refusal import check, refuse
from rp_ray.plan.report import predicted, render, short_block

__all__ = [
    "HARDWARE",
    "KINDS",
    "Calibration",
    "Efficiency",
    "EvalPlan",
    "Hardware",
    "ServePlan",
    "TrainPlan",
    "check",
    "default_path",
    "hardware",
    "load_job",
    "make_plan",
    "plan_eval",
    "plan_serve",
    "plan_train",
    "predicted",
    "probe_cpu",
    "refuse",
    "render",
    "short_block",
]
