"""Joining or starting Ray the same way for every job."""

from __future__ import annotations

import os


def ensure_ray(cpus_needed: float = 1) -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local one.

    A local cluster gets enough logical CPUs for the job's actors plus Ray Data, even
    on a 2-core box: the tiny workloads here oversubscribe happily. Token
    authentication stays at Ray's default (on for local clusters).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed) + 2))
