"""Time: FLOPs and bytes of LoRA training steps and vLLM prefill and decode, over what the hardware achieves.

Training, per token of a sequence of ``L`` tokens, for LoRA on frozen weights (``N`` = active parameters but the
input embedding, the output head included; ``n`` = LoRA parameters; ``w`` = attention width, heads x head_dim;
``pairs`` = causal (query, key) pairs per layer, windows honoured):

    forward            2 N + 2 n  + 4 w pairs / L
    backward           2 N + 4 n  + 8 w pairs / L   (activation gradients through the frozen weights, 2N; no
                                                     weight gradients for them; LoRA's own weight gradients, 2n)
    recomputation      2 N + 2 n  + 4 w pairs / L   (gradient checkpointing only)

Model FLOPs are forward + backward (``4N + 6n``, the GPU check's MFU numerator); executed FLOPs add the
recomputation. A step's time is its busiest rank's executed FLOPs over ``peak x HFU`` (the share of peak reached on
executed FLOPs, from calibration) plus a per-micro-batch overhead (calibrated; 0 until then), computed on the
training's own global batch plan (``rp_ray.train.batching.plan_epoch``: padding and rank imbalance included).

vLLM: prefill is compute-bound (``2 N`` per prompt token but the output head, which runs on the last position
only, plus ``4 w pairs``), at ``peak x compute efficiency``. Decode steps are simulated with the engine's batch
(continuous batching: a finished sequence's slot takes the next request): each step reads the weights (an MoE only
the experts the batch routes to) and every running sequence's KV cache at ``bandwidth x bandwidth efficiency``,
and computes ``2 N`` per sequence plus attention; the step takes the longer of the two (roofline).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rp_ray.plan.hardware import Hardware
from rp_ray.plan.shapes import ModelShape

NCCL_EFFICIENCY = 0.7  # share of link bandwidth an all-gather reaches (assumed)


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs per token (dense part) and per attended pair, model and executed."""

    dense_model: float
    dense_executed: float
    pair_model: float
    pair_executed: float

    def sequence(self, length: float, shape: ModelShape, executed: bool = True) -> float:
        pairs = shape.attended_pairs(length)
        if executed:
            return self.dense_executed * length + self.pair_executed * pairs
        return self.dense_model * length + self.pair_model * pairs


def train_flops(shape: ModelShape, lora_params: int, checkpointing: bool) -> TrainFlops:
    n, big, w = lora_params, shape.active_params, shape.q_width
    model = 4 * big + 6 * n
    recompute = 2 * big + 2 * n if checkpointing else 0
    return TrainFlops(model, model + recompute, 12 * w, 12 * w + (4 * w if checkpointing else 0))


@dataclass
class Schedule:
    """One epoch of the global batch plan, as work per step on the busiest rank."""

    steps_per_epoch: int
    micro_batches_per_rank: int  # per step
    step_flops: list[float]  # executed FLOPs of the busiest rank, per step
    step_pair_flops: list[float]  # the attention-score part of them (per attended pair), per step
    model_flops: float  # model FLOPs of the whole epoch, every rank
    tokens: int  # real tokens of the epoch, every rank
    positions: int  # computed positions (padding included), every rank
    imbalance: float
    longest_micro_batch: tuple[int, int]  # (rows, padded length) of the largest micro-batch

    @property
    def padding_ratio(self) -> float:
        return 1 - self.tokens / self.positions if self.positions else 0.0


def epoch_schedule(
    lengths: Sequence[int],
    shape: ModelShape,
    flops: TrainFlops,
    *,
    world: int,
    micro_batch: int,
    accumulation: int,
    seed: int,
    group_by_length: bool,
) -> Schedule:
    """The first epoch's plan as training builds it, costed per rank and step."""
    from rp_ray.train.batching import imbalance, plan_epoch

    lengths = list(lengths)
    plan = plan_epoch(
        lengths,
        world_size=world,
        micro_batch=micro_batch,
        accumulation=accumulation,
        seed=seed,
        epoch=0,
        group_by_length=group_by_length,
    )
    pair_cache: dict[int, float] = {}

    def pairs(n: int) -> float:
        if n not in pair_cache:
            pair_cache[n] = shape.attended_pairs(n)
        return pair_cache[n]

    step_flops, step_pairs, model, tokens, positions, largest = [], [], 0.0, 0, 0, (0, 0)
    for step in plan:
        busiest, busiest_pairs = 0.0, 0.0
        for rank in step:
            work, pair_work = 0.0, 0.0
            for mb in rank:
                width = max(lengths[i] for i in mb)
                # right-padded rows: the dense layers and attention compute every position of the padded width
                pair_work += len(mb) * flops.pair_executed * pairs(width)
                work += len(mb) * (flops.dense_executed * width + flops.pair_executed * pairs(width))
                model += sum(flops.dense_model * lengths[i] + flops.pair_model * pairs(lengths[i]) for i in mb)
                tokens += sum(lengths[i] for i in mb)
                positions += len(mb) * width
                largest = max(largest, (len(mb), width), key=lambda x: x[0] * x[1])
            if work > busiest:
                busiest, busiest_pairs = work, pair_work
        step_flops.append(busiest)
        step_pairs.append(busiest_pairs)
    return Schedule(
        len(plan),
        accumulation,
        step_flops,
        step_pairs,
        model,
        tokens,
        positions,
        imbalance(plan, lengths) if plan else 1.0,
        largest,
    )


def zero3_gather_seconds(shape: ModelShape, dtype_bytes: int, world: int, hw: Hardware, gpus_per_node: int) -> float:
    """One micro-batch's parameter all-gathers at ZeRO-3 (forward and again backward), per rank."""
    if world <= 1:
        return 0.0
    volume = 2 * shape.total_params * dtype_bytes * (world - 1) / world
    link = hw.interconnect if world <= gpus_per_node else hw.node_network / max(1, gpus_per_node)
    return volume / max(link * NCCL_EFFICIENCY, 1.0)


# -- vLLM ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRates:
    """What one engine achieves: FLOP/s in compute-bound work, bytes/s in bandwidth-bound work, and a fixed cost per
    decode step."""

    flops: float
    bandwidth: float
    step_overhead_s: float = 0.0


def prefill_flops(shape: ModelShape, prompt: int, lora_params: int = 0) -> float:
    """One prompt's prefill: every position through the layers, the output head on the last position only."""
    layers = shape.active_params - shape.vocab * shape.hidden
    return (
        2 * (layers + lora_params) * prompt
        + 4 * shape.q_width * shape.attended_pairs(prompt)
        + 2 * shape.hidden * shape.vocab
    )


def _weights_read(shape: ModelShape, dtype_bytes: int, batch: float) -> float:
    """Weight bytes one decode step reads: everything but the embedding table; of an MoE's experts, those the batch
    routes to (each token picks experts_per_token of the experts, taken as uniform)."""
    mxfp4 = shape.mxfp4 and dtype_bytes == 2
    total = shape.weight_bytes(dtype_bytes, mxfp4) - shape.embedding_params * dtype_bytes
    if not shape.experts:
        return total
    from rp_ray.plan.shapes import MXFP4_BYTES_PER_PARAM

    expert_bytes = shape.all_expert_params * (MXFP4_BYTES_PER_PARAM if mxfp4 else dtype_bytes)
    touched = 1 - (1 - shape.experts_per_token / shape.experts) ** max(batch, 1)
    return total - expert_bytes * (1 - touched)


def decode_step_seconds(
    shape: ModelShape, rates: EngineRates, dtype_bytes: int, batch: int, context_sum: float, context_windowed: float
) -> float:
    """One decode step of ``batch`` sequences whose contexts add up to ``context_sum`` (``context_windowed``: the
    same sum with each context capped at the sliding window)."""
    if batch <= 0:
        return 0.0
    windows = shape.windows()
    full = sum(w is None for w in windows)
    kv_token_layer = 2 * shape.kv_width * dtype_bytes
    kv = kv_token_layer * (full * context_sum + (len(windows) - full) * context_windowed)
    read = _weights_read(shape, dtype_bytes, batch) + kv
    attn_pairs = full * context_sum + (len(windows) - full) * context_windowed
    compute = 2 * shape.active_params * batch + 4 * shape.q_width * attn_pairs
    return max(read / rates.bandwidth, compute / rates.flops) + rates.step_overhead_s


@dataclass
class DecodeResult:
    seconds: float
    steps: int
    mean_batch: float


def simulate_decode(
    shape: ModelShape, rates: EngineRates, dtype_bytes: int, requests: Sequence[tuple[int, int]], batch: int
) -> DecodeResult:
    """Decode ``requests`` ((prompt, reply) tokens, in the order they are handed out) through an engine holding
    ``batch`` at a time, a freed slot refilled at once. Steps between two finishing sequences are costed at their
    midpoint's contexts."""
    window = shape.sliding_window or 0
    todo = [(p, r) for p, r in requests if r > 0]
    if not todo or batch <= 0:
        return DecodeResult(0.0, 0, 0.0)
    active: list[tuple[int, int, int]] = []  # (finish step, prompt, reply)
    ctx_sum, seconds, step, nxt, batch_steps = 0.0, 0.0, 0, 0, 0.0

    def admit() -> None:
        nonlocal nxt, ctx_sum
        while nxt < len(todo) and len(active) < batch:
            p, r = todo[nxt]
            heapq.heappush(active, (step + r, p, r))
            ctx_sum += p
            nxt += 1

    admit()
    while active:
        k = active[0][0] - step
        a = len(active)
        mid = ctx_sum + a * k / 2
        capped = min(mid, a * window) if window else mid
        seconds += k * decode_step_seconds(shape, rates, dtype_bytes, a, mid, capped)
        batch_steps += a * k
        ctx_sum += a * k
        step += k
        while active and active[0][0] == step:
            _, p, r = heapq.heappop(active)
            ctx_sum -= p + r
        admit()
    return DecodeResult(seconds, step, batch_steps / step if step else 0.0)


def staggered_finish(work_s: float, engines: int, start_gap_s: float) -> float:
    """When ``work_s`` engine-seconds are done by ``engines`` engines of which the k-th starts ``k x start_gap_s``
    after the first (CPU engines build one after another); measured from the first engine's start."""
    if engines <= 1 or start_gap_s <= 0:
        return work_s / max(engines, 1)
    lo, hi = 0.0, work_s + engines * start_gap_s
    for _ in range(60):
        mid = (lo + hi) / 2
        done = sum(max(0.0, mid - k * start_gap_s) for k in range(engines))
        lo, hi = (mid, hi) if done < work_s else (lo, mid)
    return hi


def replicas_for(load_rps: float, per_replica_rps: float) -> int:
    return max(1, math.ceil(load_rps / per_replica_rps)) if per_replica_rps > 0 else 0
