"""Deterministic batch plans: which examples go into which micro-batch of which optimizer step.

Pure functions of (lengths, sizes, seed, epoch), so every worker, and a worker that
resumes after a crash, builds exactly the same plan. Length grouping works at the
level of a whole optimizer step (micro_batch x accumulation examples): the same
examples make up a step whatever the micro-batch split, so 4 x 1 and 2 x 2 apply
the same update.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rp_ray.template import IGNORE_INDEX

MEGABATCH_STEPS = 16  # steps whose examples are sorted by length together


def plan_epoch(
    lengths: list[int], micro_batch: int, accumulation: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[list[int]]]:
    """Steps -> micro-batches -> example indices for one epoch.

    Shuffles with ``seed`` and ``epoch``; with ``group_by_length``, sorts each window
    of ``MEGABATCH_STEPS`` steps by length before cutting it into steps, then
    shuffles the steps. Examples that do not fill a last whole step are left out of
    this epoch (a different few each epoch).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    step_size = micro_batch * accumulation
    if group_by_length:
        window = step_size * MEGABATCH_STEPS
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda j: -lengths[j])]
    steps = [order[s : s + step_size] for s in range(0, len(order) - step_size + 1, step_size)]
    if group_by_length:
        rng.shuffle(steps)
    return [[step[m : m + micro_batch] for m in range(0, step_size, micro_batch)] for step in steps]


@dataclass
class PaddingStats:
    real_tokens: int = 0
    padded_tokens: int = 0  # real + pad

    @property
    def ratio(self) -> float:
        """Share of computed positions that are padding."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add_plan(self, plan: list[list[list[int]]], lengths: list[int]) -> None:
        for step in plan:
            for mb in step:
                self.real_tokens += sum(lengths[i] for i in mb)
                self.padded_tokens += max(lengths[i] for i in mb) * len(mb)


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
