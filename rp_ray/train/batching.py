"""Deterministic global batch plans: which examples each rank takes in each micro-batch of each optimizer step.

One plan covers all ranks. Every rank computes it from the lengths of *all* rows with the same seed, so ranks agree on
it without talking, and a rank that resumes after a crash rebuilds it exactly. Planning globally matters because every
collective of a step (ZeRO's gradient reduce, ZeRO-3's parameter gathers, the loss all-reduce) waits for the slowest
rank: when each rank planned its own shard, one rank could hold 2,000-token examples while another held 200-token ones
in the same step.

So all ranks take the same length bucket in the same step, and within a step the examples are dealt so that every rank
computes about as many positions (padding included) as the others, while each micro-batch holds examples of similar
length.

The examples of a global step depend only on ``world_size x micro_batch x accumulation``, never on how that product is
split, so 4 x 1 and 2 x 2 (same world size), or 2 ranks x 2 and 4 ranks x 1, apply the same update.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rp_ray.llm.template import IGNORE_INDEX

MEGABATCH_STEPS = 16  # global steps whose examples are sorted by length together

# plan[step][rank][micro][k] = index of an example in the full list of rows
Plan = list[list[list[list[int]]]]


def steps_per_epoch(n_examples: int, world_size: int, micro_batch: int, accumulation: int) -> int:
    """Whole global steps in one epoch (the examples left over are dropped, a different few each epoch)."""
    return n_examples // (world_size * micro_batch * accumulation)


def plan_epoch(
    lengths: list[int],
    *,
    world_size: int,
    micro_batch: int,
    accumulation: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> Plan:
    """Global steps -> ranks -> micro-batches -> example indices, for one epoch.

    ``lengths`` are the token counts of all rows (every rank passes the same list and the same ``seed``). The rows are
    shuffled with ``seed`` and ``epoch``; the last ``len % step_size`` of that order are left out of the epoch. With
    ``group_by_length``, each window of ``MEGABATCH_STEPS`` steps is sorted by length before it is cut into steps, and
    the steps are shuffled, so a step holds examples of similar length. Each step is then dealt to ranks by
    ``deal_step``. The sizes are keyword-only: the per-rank planner this replaced took (micro_batch, accumulation, seed,
    epoch) positionally, and such a call must fail, not plan something else.
    """
    for name, value in (("world_size", world_size), ("micro_batch", micro_batch), ("accumulation", accumulation)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    step_size = world_size * micro_batch * accumulation
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    del order[len(order) - len(order) % step_size :]  # random leftovers: a different few each epoch
    if group_by_length:
        window = step_size * MEGABATCH_STEPS
        order = [
            i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda j: -lengths[j])
        ]
    steps = [order[s : s + step_size] for s in range(0, len(order), step_size)]
    if group_by_length:
        rng.shuffle(steps)  # long and short steps interleaved, not one epoch-long ramp
    return [deal_step(step, lengths, world_size, micro_batch, accumulation) for step in steps]


def deal_step(
    examples: list[int], lengths: list[int], world_size: int, micro_batch: int, accumulation: int
) -> list[list[list[int]]]:
    """One global step's examples -> ranks -> micro-batches, balancing the positions each rank computes.

    The examples are sorted longest first and cut into ``accumulation`` chunks of ``world_size x micro_batch``: chunk j
    is micro-batch j on every rank, so the ranks run micro-batches of similar cost side by side (ZeRO syncs on each
    one). Within a chunk, consecutive examples form a micro-batch (similar lengths, little padding), and the costliest
    micro-batch goes to the rank that has computed least so far in this step. That keeps the spread between ranks within
    the largest cost gap inside one chunk, whatever the number of chunks.
    """
    if len(examples) != world_size * micro_batch * accumulation:
        raise ValueError(
            f"a step holds world_size x micro_batch x accumulation = {world_size * micro_batch * accumulation} "
            f"examples, got {len(examples)}"
        )
    ranked = sorted(examples, key=lambda i: (-lengths[i], i))
    chunk_size = world_size * micro_batch
    plan: list[list[list[int]]] = [[[] for _ in range(accumulation)] for _ in range(world_size)]
    load = [0] * world_size  # positions (padding included) each rank computes in this step so far
    for j in range(accumulation):
        chunk = ranked[j * chunk_size : (j + 1) * chunk_size]
        blocks = [chunk[k : k + micro_batch] for k in range(0, chunk_size, micro_batch)]  # costliest first
        for block, rank in zip(blocks, sorted(range(world_size), key=lambda r: (load[r], r)), strict=True):
            plan[rank][j] = block
            load[rank] += _positions(block, lengths)
    return plan


def _positions(micro_batch: list[int], lengths: list[int]) -> int:
    """Positions a right-padded micro-batch computes: its size x its longest example."""
    return len(micro_batch) * max(lengths[i] for i in micro_batch)


def rank_positions(plan: Plan, lengths: list[int]) -> list[list[int]]:
    """Per step, per rank: the positions (padding included) that rank computes in that step."""
    return [[sum(_positions(mb, lengths) for mb in rank) for rank in step] for step in plan]


def imbalance(plan: Plan, lengths: list[int]) -> float:
    """Mean over steps of (the busiest rank's positions / the mean over ranks); 1.0 = perfectly even.

    Positions include padding, which is what a rank computes; with micro-batches of one they are the tokens. Each step
    lasts as long as its busiest rank, so the share of GPU time doing useful work is about ``1 / imbalance``.
    """
    ratios = [max(step) * len(step) / sum(step) for step in rank_positions(plan, lengths) if sum(step)]
    return sum(ratios) / len(ratios) if ratios else 1.0


@dataclass
class PaddingStats:
    real_tokens: int = 0
    padded_tokens: int = 0  # real + pad

    @property
    def ratio(self) -> float:
        """Share of computed positions that are padding."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add_plan(self, plan: Plan, lengths: list[int]) -> None:
        """Count every micro-batch of every rank of a global plan."""
        micro_batches = [mb for step in plan for rank in step for mb in rank]
        self.real_tokens += sum(lengths[i] for mb in micro_batches for i in mb)
        self.padded_tokens += sum(_positions(mb, lengths) for mb in micro_batches)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.as_tensor(e["input_ids"])
        labels[r, :n] = torch.as_tensor(e["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(examples: list[dict]) -> int:
    """Tokens that carry loss once shifted (the first position predicts nothing)."""
    return sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in examples)
