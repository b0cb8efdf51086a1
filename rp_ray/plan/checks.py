"""Checks that refuse a GPU config which cannot run, before anything is scheduled, each naming the key and the fix.

- a training micro-batch whose step does not fit a device (fix: per_device_batch_size, gradient_checkpointing,
  deepspeed.stage);
- a vLLM engine whose KV cache cannot hold one sequence of ``max_model_len`` tokens;
- ``max_lora_rank`` below an adapter's rank (read from its ``adapter_config.json``);
- ``tensor_parallel_size`` above the GPUs of a node (a vLLM engine's GPUs share one node);
- ZeRO-3 whose per-micro-batch all-gather of the frozen weights takes longer than the micro-batch's compute.

``rp_ray.plan.planner`` composes them into a plan's problems; ``rp_ray.plan.refusal.check`` runs them on a config
before launch, without reading data.
"""

from __future__ import annotations

from collections.abc import Callable

from rp_ray.plan import memory as mem
from rp_ray.plan.hardware import GIB, Hardware
from rp_ray.plan.shapes import ModelShape

DEFAULT_SUPERVISED_SHARE = 0.3  # labelled share of a row when the data is not read


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def micro_batch_problem(
    memory: mem.Breakdown,
    micro_batch: int,
    seq_len: int,
    largest: int,
    alternatives: dict[str, float],
    hw: Hardware,
    world: int,
) -> str | None:
    """The step of ``micro_batch`` rows of ``seq_len`` tokens needs more than a device holds."""
    if memory.fits:
        return None
    where = (
        f"one {hw.name} ({_gib(memory.capacity)})"
        if hw.gpu
        else f"a worker's share of host memory ({_gib(memory.capacity)} of {world})"
    )
    fixes = []
    if largest:
        fixes.append(f"per_device_batch_size={largest} (the largest that fits)")
    for fix, need in alternatives.items():
        fixes.append(f"{fix} ({_gib(need)}{'' if need <= memory.capacity else ', still too much'})")
    if not fixes or (not largest and all(v > memory.capacity for v in alternatives.values())):
        fixes.append("a lower data.cutoff_len, deepspeed.offload_optimizer / offload_params, or a larger device")
    return (
        f"per_device_batch_size={micro_batch}: a step of {micro_batch} x {seq_len}-token rows needs "
        f"{_gib(memory.total)} per device, more than {where}. Fix: " + "; or ".join(fixes)
    )


def kv_cache_problem(
    engine_at: Callable[[int], mem.EngineMemory], shape: ModelShape, max_model_len: int, hw: Hardware, tp: int
) -> str | None:
    """The engine's KV cache cannot hold one sequence of ``max_model_len`` tokens (vLLM refuses to start).
    ``engine_at(n)``: the engine's memory with max_model_len n (its activations grow with it)."""
    engine = engine_at(max_model_len)
    need = engine.seq_bytes(shape, max_model_len)
    if engine.kv_bytes >= need:
        return None
    if not hw.gpu:
        gib = max(1, -(-int(need * 1.05) // GIB))
        return (
            f"max_model_len={max_model_len}: one sequence needs {_gib(need)} of KV cache, the CPU engine has "
            f"cpu_kv_cache_gib={engine.kv_bytes / GIB:g}. Fix: cpu_kv_cache_gib={gib}, or "
            f"max_model_len<={engine.longest(shape)}"
        )
    lo, hi = 0, max_model_len  # the longest max_model_len whose engine holds one such sequence
    while lo < hi:
        mid = (lo + hi + 1) // 2
        e = engine_at(mid)
        lo, hi = (mid, hi) if e.kv_bytes >= e.seq_bytes(shape, mid) else (lo, mid - 1)
    used = ", ".join(f"{n} {_gib(b)}" for n, b, _ in engine.breakdown.lines if n != "KV cache")
    fixes = [f"max_model_len<={lo}" if lo >= 16 else None, f"tensor_parallel_size={tp * 2}", "a GPU with more memory"]
    return (
        f"max_model_len={max_model_len}: one sequence needs {_gib(need)} of KV cache per GPU, but the engine on "
        f"{hw.name} keeps only {_gib(engine.kv_bytes)} for it ({used}, of "
        f"{mem.VLLM_MEMORY_UTILIZATION:.0%} of its memory). Fix: " + "; or ".join(f for f in fixes if f)
    )


def lora_rank_problems(max_lora_rank: int | None, adapters: dict[str, str]) -> list[str]:
    """Adapters whose rank exceeds a set ``max_lora_rank`` (vLLM refuses to load them)."""
    from rp_ray.llm.vllm_engine import VLLM_LORA_RANKS, adapter_rank

    if max_lora_rank is None:
        return []
    out = []
    for name, path in adapters.items():
        try:
            r = adapter_rank(path)
        except ValueError:
            continue  # not here to read: the engine reports it when it loads
        if r > max_lora_rank:
            fit = next((v for v in VLLM_LORA_RANKS if v >= r), None)
            out.append(
                f"max_lora_rank={max_lora_rank}: adapter {name} ({path}) has rank {r}. Fix: "
                + (f"max_lora_rank={fit}, or " if fit else "")
                + "leave max_lora_rank unset (the smallest rank that holds every adapter)"
            )
    return out


def tensor_parallel_problem(tp: int, gpus_per_node: int) -> str | None:
    if tp <= gpus_per_node:
        return None
    return (
        f"tensor_parallel_size={tp}: a node has {gpus_per_node} GPUs and one vLLM engine's GPUs must be on one node. "
        f"Fix: tensor_parallel_size<={gpus_per_node} (more engines: num_actors / replicas), or --gpus-per-node if "
        f"your nodes have more"
    )


def zero3_problem(
    gather_s: float, compute_s: float, weights_bytes: float, stage2_fits: bool, stage2_bytes: float
) -> str | None:
    """ZeRO-3 that waits on its all-gathers: each micro-batch gathers every frozen weight, forward and backward."""
    if gather_s <= compute_s or compute_s <= 0:
        return None
    fix = f"deepspeed.stage=2 ({_gib(stage2_bytes)} per device{'' if stage2_fits else ', does not fit'})"
    return (
        f"deepspeed.stage=3 is communication-bound: a micro-batch all-gathers {weights_bytes * 2 / 1e9:.1f} GB of "
        f"weights (forward and backward) in {gather_s:.2f} s against {compute_s:.2f} s of compute, "
        f"{gather_s / compute_s:.1f}x as long. Fix: {fix}, or a larger per_device_batch_size"
    )
