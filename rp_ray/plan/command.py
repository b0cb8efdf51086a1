"""``rp-ray plan``: the plan of a config, or ``--calibrate`` from finished runs."""

from __future__ import annotations

import argparse
import json

from rp_ray.plan.hardware import KINDS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="before launching: memory per device, time and cost of a train, eval or serve config (the kind read "
        "from the config), and the checks that refuse one that cannot run; --calibrate folds finished runs in",
    )
    p.add_argument(
        "config", nargs="?", help="a train, eval or serve config (jobs/configs/*.yaml, serve_configs/*.yaml)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. per_device_batch_size=4")
    p.add_argument("--gpu", choices=KINDS, help="the device (default: H100 for GPU configs, else this CPU, measured)")
    p.add_argument("--gpus", type=int, help="GPUs in all: training workers, or eval engines x tensor_parallel_size")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs a node has (default 8, cluster.yaml's p5 nodes)")
    p.add_argument("--price-per-gpu-hour", type=float, help="price of one device-hour, for the cost line")
    p.add_argument(
        "--calibration", help="calibration file (default $RP_RAY_CALIBRATION or ~/.cache/rp_ray/calibration.json)"
    )
    p.add_argument("--calibrate", nargs="+", metavar="OUTPUT_DIR", help="fold finished runs into the calibration file")
    p.add_argument("--requests-per-s", type=float, help="serve: the load to size replicas for")
    p.add_argument("--context-tokens", type=int, default=1536, help="serve: tokens of a chat (default 1536)")
    p.add_argument("--reply-tokens", type=int, default=200, help="serve: tokens of a reply (default 200)")
    p.add_argument("--json", action="store_true", help="print the predicted figures as JSON after the report")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from rp_ray.plan.calibration import Calibration
    from rp_ray.plan.planner import EvalPlan, TrainPlan, make_plan
    from rp_ray.plan.report import predicted, render

    if a.calibrate:
        from rp_ray.plan.runs import calibrate

        print(
            "\n".join(
                calibrate([a.config, *a.overrides, *a.calibrate] if a.config else a.calibrate, a.calibration, a.gpu)
            )
        )
        return 0
    if not a.config:
        raise ValueError("rp-ray plan needs a config file (or --calibrate OUTPUT_DIR...)")
    plan = make_plan(
        a.config,
        a.overrides,
        gpu=a.gpu,
        gpus=a.gpus,
        price=a.price_per_gpu_hour,
        calibration=Calibration.load(a.calibration),
        gpus_per_node=a.gpus_per_node,
        context_tokens=a.context_tokens,
        reply_tokens=a.reply_tokens,
        requests_per_s=a.requests_per_s,
    )
    print(render(plan))
    if a.json and isinstance(plan, TrainPlan | EvalPlan):
        print(json.dumps(predicted(plan), indent=2))
    return 1 if plan.problems else 0
