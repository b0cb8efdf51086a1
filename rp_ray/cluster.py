"""Joining or starting Ray the same way for every job."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(cpus_needed: float = 1) -> None:
    """Join a running cluster (RAY_ADDRESS, as under `ray job submit`, or one `ray start`ed on this
    machine), else start a local one.

    A local cluster gets enough logical CPUs for the job's actors plus Ray Data, even
    on a 2-core box: the tiny workloads here oversubscribe happily. Token
    authentication stays at Ray's default (on for local clusters).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
        log.info("joined the running Ray cluster")
    except ConnectionError:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed) + 2))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for local apps and test clusters)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
