"""Memory per device: a LoRA training step under DeepSpeed ZeRO, and a vLLM engine's KV cache.

Training, per GPU (bytes; ``b`` = bytes per weight element, 2 for bf16, 4 for float32; ``n`` = LoRA parameters,
``W`` = ranks):

- frozen weights: all of them below ZeRO-3 (stage 2 partitions only what trains); at stage 3 a ``1/W`` partition
  plus what DeepSpeed gathers at a time (a layer or the output head, plus its prefetch bucket, at most
  ``stage3_max_live_parameters``); with ``offload_params`` only the gathered part;
- LoRA: parameters ``n b``, gradients ``n b`` plus, at stages 2-3, their float32 accumulation partition
  ``4 n / W``, and AdamW's float32 master copy, first and second moments ``12 n`` (``/W`` at stages 2-3; none on
  the GPU with ``offload_optimizer``);
- activations: what one token leaves for the backward pass in one layer (:func:`activation_bytes_per_token`) times
  layers times the micro-batch's positions; with gradient checkpointing each layer keeps its input (``b h``) and
  one layer at a time is recomputed in full;
- logits and loss: the logits of every position (``b T V`` for ``T`` positions; the loss keeps only the labelled
  rows, so the full logits are freed before the backward pass, whose gradient of them takes their place), and for
  the ``S`` labelled positions the gathered rows, their float32 copy and its log-softmax (``(b + 8) S V``);
- communication buckets: the gradient reduce bucket (DeepSpeed's ``reduce_bucket_size``, 5e7 elements, or the
  LoRA gradients when fewer);
- runtime: CUDA context, cuBLAS and NCCL workspaces (1 GiB) and the caching allocator's fragmentation (5% of the
  tensors). On a CPU worker: the Python, torch, Ray and DeepSpeed process itself (1 GiB until calibrated).

vLLM, per GPU of an engine: ``gpu_memory_utilization`` (vLLM's default, 0.92) of the memory, less the weights (MXFP4
experts stay MXFP4 on GPUs), the LoRA slots (``max_loras x max_lora_rank``, every adaptable layer), the profiling
run's activations at ``max_num_batched_tokens`` and the sampler's logits at ``max_num_seqs``, and CUDA graphs and
runtime (1.5 GiB), is the KV cache. A CPU engine's KV cache is ``cpu_kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from rp_ray.plan.hardware import GIB, Hardware
from rp_ray.plan.shapes import ModelShape

REDUCE_BUCKET = 5e7  # elements: the generated DeepSpeed config's reduce_bucket_size
STAGE0_BUCKET = 5e8  # elements: DeepSpeed's allreduce_bucket_size default (stage 0)
PREFETCH_BUCKET = 5e7  # elements: stage3_prefetch_bucket_size default
MAX_LIVE = 1e9  # elements: stage3_max_live_parameters default
GPU_RUNTIME = 1.0 * GIB
FRAGMENTATION = 0.05
CPU_WORKER_RUNTIME = 1.0 * GIB
CPU_DRIVER = 2.0 * GIB  # the driver, Ray's own processes and object store on a one-machine run
VLLM_MEMORY_UTILIZATION = 0.92  # vLLM 0.32's gpu_memory_utilization default; rp_ray does not set it
VLLM_RUNTIME = 1.5 * GIB
VLLM_BLOCK = 16  # tokens per KV block


def largest_that_fits(fits: Callable[[int], bool], limit: int) -> int:
    """The largest ``n`` of 0 to ``limit`` for which ``fits(n)`` (0: none), by bisection (``fits`` holds up to a
    point and not beyond it)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Breakdown:
    """Named byte counts; ``capacity`` is what the device offers this process."""

    lines: list[tuple[str, float, str]] = field(default_factory=list)
    capacity: float = 0.0

    def add(self, name: str, nbytes: float, note: str = "") -> None:
        self.lines.append((name, float(nbytes), note))

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.lines)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def get(self, name: str) -> float:
        return sum(b for n, b, _ in self.lines if n == name)


def activation_bytes_per_token(
    shape: ModelShape, dtype_bytes: int, lora_rank: int, n_lora_modules: int, eager_len: float = 0.0
) -> float:
    """Bytes one token leaves in one decoder layer for the backward pass (no checkpointing), as transformers'
    modules save them:

    - each RMSNorm keeps its input cast to float32 (``4h``), twice;
    - attention: its input (``h``), q, k and v after RoPE (``q + 2kv``) and its output, the o_proj input (``q``);
      SDPA / flex keep a float32 log-sum-exp per head; eager attention (``eager_len`` > 0) also keeps the softmax
      (float32) and the probabilities over ``eager_len`` keys per head;
    - dense MLP: its input (``h``), gate and up outputs, SiLU(gate), their product, the down_proj input (``4i``);
    - MoE MLP: the router's float32 logits, and per routed expert the gathered input and weighted output (``2h``)
      and gate_up output, clamped gate and up, sigmoid, GLU and down input (``7i``);
    - LoRA: each adapted layer keeps A's output (``r``).
    """
    h, q, kv, i, b = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate, dtype_bytes
    norms = 2 * 4 * h
    attention = b * (h + 2 * q + 2 * kv) + 4 * shape.heads
    if eager_len:
        attention += shape.heads * eager_len * (4 + b)
    dense = b * (h + 4 * i)
    mlp = 4 * shape.experts + shape.experts_per_token * b * (2 * h + 7 * i) if shape.experts else dense
    return norms + attention + mlp + n_lora_modules * lora_rank * b


@dataclass(frozen=True)
class TrainSetup:
    """What a training step's memory depends on besides the model."""

    dtype_bytes: int
    world: int
    stage: int
    offload_params: bool
    offload_optimizer: bool
    checkpointing: bool
    lora_params: int
    lora_rank: int
    lora_modules: int
    eager_attention: bool
    cpu_worker_runtime: float = CPU_WORKER_RUNTIME  # a CPU worker's process itself (calibrated from runs)


def train_memory(
    shape: ModelShape, setup: TrainSetup, hw: Hardware, micro_batch: int, seq_len: int, supervised_share: float
) -> Breakdown:
    """Peak memory of one worker in a step whose micro-batches are ``micro_batch`` rows padded to ``seq_len``."""
    b, n, w = setup.dtype_bytes, setup.lora_params, setup.world
    out = Breakdown()
    total = shape.total_params
    if setup.stage == 3:
        gathered = min(MAX_LIVE, max(shape.layer_params, shape.vocab * shape.hidden) + PREFETCH_BUCKET) * b
        if setup.offload_params:
            out.add("weights", gathered, f"ZeRO-3, offloaded to CPU; {gathered / b / 1e6:.0f}M gathered at a time")
        else:
            out.add(
                "weights",
                total * b / w + gathered,
                f"ZeRO-3: 1/{w} of {total:,} x {b} B, plus {gathered / b / 1e6:.0f}M gathered at a time",
            )
    else:
        out.add("weights", total * b, f"{total:,} x {b} B, every rank (ZeRO-{setup.stage} leaves frozen weights whole)")
    out.add("LoRA parameters", n * b, f"{n:,} (rank {setup.lora_rank}, {setup.lora_modules} modules a layer)")
    part = w if setup.stage >= 2 else 1
    grads = n * b + (4 * n / part if setup.stage >= 2 else 0)
    dtype = "bf16" if b == 2 else "float32"
    out.add("LoRA gradients", grads, f"{dtype}, plus the float32 accumulation partition" if setup.stage >= 2 else dtype)
    opt = 0.0 if setup.offload_optimizer else 12 * n / part
    out.add(
        "optimizer state",
        opt,
        "offloaded to CPU" if setup.offload_optimizer else f"AdamW float32 master, m, v; /{part}",
    )
    positions = micro_batch * seq_len
    per_token = activation_bytes_per_token(
        shape, b, setup.lora_rank, setup.lora_modules, seq_len if setup.eager_attention else 0.0
    )
    if setup.checkpointing:
        act = positions * (shape.layers * b * shape.hidden + per_token)
        kept = b * shape.hidden / 1024
        note = f"checkpointing: {kept:.0f} KiB/token/layer kept + one layer of {per_token / 1024:.0f} KiB"
    else:
        act = positions * shape.layers * per_token
        note = f"{per_token / 1024:.0f} KiB/token/layer x {shape.layers} layers"
    out.add("activations", act, f"{note} x {micro_batch} x {seq_len} tokens")
    labelled = positions * supervised_share
    logits = b * positions * shape.vocab + (b + 8) * labelled * shape.vocab
    out.add("logits + loss", logits, f"vocab {shape.vocab}, {labelled:.0f} labelled positions")
    bucket = min(STAGE0_BUCKET if setup.stage == 0 else REDUCE_BUCKET, n) * b
    out.add("communication buckets", bucket, "gradient reduce bucket")
    tensors = out.total
    if hw.gpu:
        out.add("runtime reserve", GPU_RUNTIME + FRAGMENTATION * tensors, "CUDA context, workspaces, fragmentation")
        out.capacity = hw.memory_bytes
    else:
        out.add("runtime reserve", setup.cpu_worker_runtime, "the worker process: Python, torch, Ray, DeepSpeed")
        out.capacity = max(0.0, (hw.memory_bytes - CPU_DRIVER) / w)
    return out


@dataclass
class EngineMemory:
    """One vLLM engine, per GPU (a CPU engine: its KV cache only)."""

    breakdown: Breakdown
    kv_bytes: float  # per GPU
    kv_dtype_bytes: int
    tp: int

    def seq_bytes(self, shape: ModelShape, context: float) -> float:
        """KV cache one sequence of ``context`` tokens takes on each GPU (blocks rounded up on average)."""
        return shape.kv_bytes(context + VLLM_BLOCK / 2, self.kv_dtype_bytes) / self.tp

    def sequences(self, shape: ModelShape, context: float) -> int:
        """Sequences of ``context`` tokens the KV cache holds at once."""
        return max(0, math.floor(self.kv_bytes / self.seq_bytes(shape, context))) if context > 0 else 0

    def longest(self, shape: ModelShape) -> int:
        """The longest single sequence the KV cache holds (vLLM refuses a max_model_len above it)."""
        return largest_that_fits(lambda n: shape.kv_bytes(n, self.kv_dtype_bytes) / self.tp <= self.kv_bytes, 1 << 24)


def engine_memory(
    shape: ModelShape,
    hw: Hardware,
    *,
    dtype_bytes: int,
    tp: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    lora_slots: int,
    lora_rank: int,
    cpu_kv_cache_gib: float,
) -> EngineMemory:
    """The KV cache a vLLM engine is left with, and where the rest of its memory goes."""
    out = Breakdown()
    if not hw.gpu:
        kv = max(1, round(cpu_kv_cache_gib)) * GIB  # what VLLM_CPU_KVCACHE_SPACE gets (whole GiB)
        out.add("KV cache", kv, "cpu_kv_cache_gib")
        out.capacity = hw.memory_bytes
        return EngineMemory(out, kv, dtype_bytes, 1)
    budget = VLLM_MEMORY_UTILIZATION * hw.memory_bytes
    out.capacity = budget
    mxfp4 = shape.mxfp4
    out.add(
        "weights", shape.weight_bytes(dtype_bytes, mxfp4) / tp, ("MXFP4 experts, " if mxfp4 else "") + f"/{tp} GPUs"
    )
    per_slot = lora_rank * shape.layers * sum(i + o for i, o in shape.linears().values()) * dtype_bytes / tp
    out.add("LoRA slots", lora_slots * per_slot, f"{lora_slots} x rank {lora_rank}")
    i_eff = shape.intermediate * (shape.experts_per_token or 1)
    act = max_num_batched_tokens * dtype_bytes * (shape.hidden + 3 * i_eff) / tp + max_num_seqs * shape.vocab * 4 * 2
    out.add("activations", act, f"profiling at {max_num_batched_tokens} tokens, sampler at {max_num_seqs} sequences")
    out.add("CUDA graphs + runtime", VLLM_RUNTIME, "assumed")
    kv = budget - out.total
    out.add("KV cache", max(kv, 0.0), f"the rest of {VLLM_MEMORY_UTILIZATION:.0%} of {hw.memory_bytes / GIB:.0f} GiB")
    return EngineMemory(out, max(kv, 0.0), dtype_bytes, tp)
