"""The hardware a plan is made for: one table of accelerators, each figure with its source, and the CPU measured on
the spot.

GPU figures are per device, dense (no 2:4 sparsity) bf16 tensor-core peak, memory bandwidth and capacity from the
vendor's datasheet, the NVLink (or PCIe) bandwidth one GPU has to the others in its node, per direction, and the
network between nodes of the usual 8-GPU server of that kind. Achieved figures are lower; the share of peak a job
reaches comes from ``rp_ray.plan.calibration``.

``cpu`` is measured where the plan runs (:func:`probe_cpu`): one thread's float32 matmul rate and memory copy
bandwidth, which is what one thread of a CPU training worker or CPU vLLM engine gets (Ray runs a worker with
``OMP_NUM_THREADS`` equal to its CPUs, so a worker of N CPUs is N of these).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One device of a kind: what a training worker or (with tensor_parallel_size 1) a vLLM engine gets."""

    kind: str  # the table key (--gpu)
    name: str
    peak_flops: float  # FLOP/s: dense bf16 tensor-core peak (cpu: float32, one thread, measured)
    memory_bandwidth: float  # bytes/s (cpu: one thread's copy bandwidth, measured)
    memory_bytes: float  # per device (cpu: the host's memory, shared by every worker)
    interconnect: float  # bytes/s to the other devices of a node, per direction
    interconnect_name: str
    node_network: float  # bytes/s between nodes, per node
    source: str
    gpu: bool = True
    cores: int = 1  # cpu: cores this process may run on


# Memory: the datasheets' "80GB" / "141GB" are the HBM stacks' binary sizes (the driver reports about 1% less, kept
# by the runtime reserve of the memory plans). Node networks are those of the vendor's reference 8-GPU systems.
HARDWARE: dict[str, Hardware] = {
    "H100": Hardware(
        kind="H100",
        name="NVIDIA H100 SXM5 80GB",
        peak_flops=989.4e12,
        memory_bandwidth=3.35e12,
        memory_bytes=80 * GIB,
        interconnect=450 * GB,
        interconnect_name="NVLink 4, 900 GB/s bidirectional",
        node_network=400 * GB,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity = 989 dense, HBM3 "
        "3.35 TB/s, 80GB, NVLink 900 GB/s); node network: AWS p5.48xlarge (3,200 Gbps EFA), cluster.yaml's worker",
    ),
    "H800": Hardware(
        kind="H800",
        name="NVIDIA H800 SXM5 80GB",
        peak_flops=989.4e12,
        memory_bandwidth=3.35e12,
        memory_bytes=80 * GIB,
        interconnect=200 * GB,
        interconnect_name="NVLink 4, 400 GB/s bidirectional",
        node_network=400 * GB,
        source="NVIDIA H800 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity = 989 dense, HBM3 "
        "3.35 TB/s, 80GB, NVLink 400 GB/s); node network: 8 x 400 Gb/s ConnectX-7 of an HGX H800 server",
    ),
    "H200": Hardware(
        kind="H200",
        name="NVIDIA H200 SXM 141GB",
        peak_flops=989.4e12,
        memory_bandwidth=4.8e12,
        memory_bytes=141 * GIB,
        interconnect=450 * GB,
        interconnect_name="NVLink 4, 900 GB/s bidirectional",
        node_network=400 * GB,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity = 989 dense, HBM3e "
        "4.8 TB/s, 141GB, NVLink 900 GB/s); node network: 8 x 400 Gb/s ConnectX-7 of an HGX H200 server",
    ),
    "A100-80G": Hardware(
        kind="A100-80G",
        name="NVIDIA A100 SXM4 80GB",
        peak_flops=312e12,
        memory_bandwidth=2.039e12,
        memory_bytes=80 * GIB,
        interconnect=300 * GB,
        interconnect_name="NVLink 3, 600 GB/s bidirectional",
        node_network=200 * GB,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: BF16 312 TFLOPS dense, HBM2e 2,039 GB/s, "
        "NVLink 600 GB/s); node network: DGX A100 datasheet (8 x 200 Gb/s HDR InfiniBand)",
    ),
    "L40S": Hardware(
        kind="L40S",
        name="NVIDIA L40S 48GB",
        peak_flops=362.05e12,
        memory_bandwidth=864 * GB,
        memory_bytes=48 * GIB,
        interconnect=32 * GB,
        interconnect_name="PCIe 4.0 x16, no NVLink",
        node_network=50 * GB,
        source="NVIDIA L40S GPU datasheet (BF16 362.05 TFLOPS dense / 733 with sparsity, GDDR6 864 GB/s, 48GB, "
        "PCIe Gen4 x16 64 GB/s bidirectional); node network: 400 Gb/s, a typical L40S server's",
    ),
}
GPU_KINDS = tuple(HARDWARE)
KINDS = (*GPU_KINDS, "cpu")
DEFAULT_GPU = "H100"  # cluster.yaml's workers (p5.48xlarge)


def _host_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8.0 * GIB


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def probe_cpu(seconds: float = 0.6) -> Hardware:
    """This machine's CPU, measured now on one thread: a float32 matmul (what training and CPU vLLM engines compute
    with) for half of ``seconds``, a memory copy for the other half. Other work running at the same time lowers both
    figures; the plan says they were measured."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2 or n < 3:
            a @ b
            n += 1
        flops = 2 * 512**3 * n / (time.perf_counter() - t0)
        src = torch.empty(16 * 2**20)  # 64 MiB: far past the caches
        dst = torch.empty_like(src)
        dst.copy_(src)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2 or n < 3:
            dst.copy_(src)
            n += 1
        bandwidth = 2 * src.numel() * 4 * n / (time.perf_counter() - t0)  # read + write
    finally:
        torch.set_num_threads(old)
    return cpu_hardware(flops, bandwidth)


def cpu_hardware(flops_per_thread: float = 0.0, bandwidth_per_thread: float = 0.0) -> Hardware:
    """The ``cpu`` entry from one thread's figures (0 = not measured: enough for memory checks)."""
    cores = _cores()
    return Hardware(
        kind="cpu",
        name=f"this machine's CPU ({cores} cores)",
        peak_flops=flops_per_thread,
        memory_bandwidth=bandwidth_per_thread,
        memory_bytes=_host_memory(),
        interconnect=bandwidth_per_thread,  # gloo between workers goes through shared memory
        interconnect_name="shared memory (gloo)",
        node_network=0.0,
        source="measured on the spot: float32 512x512 matmul and a 64 MiB copy, one thread each"
        if flops_per_thread
        else "host memory only (not measured)",
        gpu=False,
        cores=cores,
    )


_probed: list[Hardware] = []


def hardware(kind: str, probe: bool = True) -> Hardware:
    """The table's entry for ``kind`` (``cpu``: measured when ``probe``, once per process); a ValueError lists the
    kinds."""
    if kind == "cpu":
        if not probe:
            return cpu_hardware()
        if not _probed:
            _probed.append(probe_cpu())
        return _probed[0]
    for k, hw in HARDWARE.items():
        if k.lower() == kind.lower():
            return hw
    raise ValueError(f"--gpu {kind}: unknown hardware; choose one of {', '.join(KINDS)}")


def kind_of_device_name(name: str) -> str | None:
    """The table kind of a device name as torch or nvidia-smi print it (``NVIDIA H800``), or None."""
    low = name.lower()
    for kind in GPU_KINDS:
        if kind.split("-")[0].lower() in low:
            return kind
    return None


def scaled(hw: Hardware, threads: int) -> Hardware:
    """A CPU worker or engine of ``threads`` threads (each runs at the measured one-thread rate)."""
    if hw.gpu or threads == 1:
        return hw
    return replace(hw, peak_flops=hw.peak_flops * threads, memory_bandwidth=hw.memory_bandwidth * threads)
