"""Global batch planning: every rank takes examples of the same length bucket in the same step, with even work.

Checked on ChatHaruhi's real train split (token lengths from our llama3 encoder at cutoff
2048; skipped when the shared data is absent) against a simulation of the per-rank planning
it replaces, and as properties (hypothesis) of the plan on arbitrary lengths and sizes.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import SHARED_HARUHI
from hypothesis import given, settings
from hypothesis import strategies as st

from rp_ray.train.batching import (
    MEGABATCH_STEPS,
    PaddingStats,
    deal_step,
    imbalance,
    plan_epoch,
    rank_positions,
    steps_per_epoch,
)

# --- ChatHaruhi train: the balance the planner was written for -----------------------------------------------


@pytest.fixture(scope="session")
def haruhi_train_lengths(llama3_tok) -> list[int]:
    """Token lengths of every valid haruhi_train row as training encodes it (llama3, cutoff 2048), once per session."""
    if not (SHARED_HARUHI / "haruhi_train.json").is_file():
        pytest.skip(f"full ChatHaruhi train split not found under {SHARED_HARUHI}")
    from rp_ray.config import DataConfig
    from rp_ray.data import load_splits
    from rp_ray.llm.template import LLAMA3, encode_supervised

    train, _, _ = load_splits(DataConfig(dataset_dir=str(SHARED_HARUHI), train=["haruhi_train"], val=[]))
    return [len(encode_supervised(llama3_tok, LLAMA3, conv, cutoff_len=2048)[0]) for conv in train]


def per_rank_plan(lengths, micro_batch, accumulation, seed, epoch):
    """The planning being replaced, as it ran on each rank over that rank's own shard (length-grouped)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    step_size = micro_batch * accumulation
    window = step_size * MEGABATCH_STEPS
    order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda j: -lengths[j])]
    steps = [order[s : s + step_size] for s in range(0, len(order) - step_size + 1, step_size)]
    rng.shuffle(steps)
    return [[step[m : m + micro_batch] for m in range(0, step_size, micro_batch)] for step in steps]


def per_rank_baseline(lengths, world_size, micro_batch, accumulation, seed=42, epoch=0):
    """What the ranks ran together: a random equal shard each, planned with seed + 7919 x rank, step k side by side."""
    rows = list(range(len(lengths)))
    random.Random(seed).shuffle(rows)
    size = len(rows) // world_size
    shards = [rows[r * size : (r + 1) * size] for r in range(world_size)]
    plans = [
        per_rank_plan([lengths[i] for i in shard], micro_batch, accumulation, seed + 7919 * r, epoch)
        for r, shard in enumerate(shards)
    ]
    n_steps = min(len(p) for p in plans)
    return [[[[shards[r][i] for i in mb] for mb in plans[r][k]] for r in range(world_size)] for k in range(n_steps)]


def micro_imbalance(plan, lengths) -> float:
    """Like ``imbalance``, per micro-batch slot: ZeRO syncs the ranks on every micro-batch, not only per step."""
    ratios = []
    for step in plan:
        for j in range(len(step[0])):
            cost = [len(rank[j]) * max(lengths[i] for i in rank[j]) for rank in step]
            ratios.append(max(cost) * len(cost) / sum(cost))
    return sum(ratios) / len(ratios)


# micro 1 x accumulation 8: the 4-GPU recipe's step at micro-batch 1; 2 x 8 as shipped; 2 x 4 half the step.
@pytest.mark.parametrize("micro_batch, accumulation", [(1, 8), (2, 8), (2, 4)])
@pytest.mark.parametrize("world_size", [4, 8])
def test_haruhi_ranks_do_even_work(haruhi_train_lengths, world_size, micro_batch, accumulation):
    lengths = haruhi_train_lengths
    plan = plan_epoch(
        lengths, world_size=world_size, micro_batch=micro_batch, accumulation=accumulation, seed=42, epoch=0
    )
    old = per_rank_baseline(lengths, world_size, micro_batch, accumulation)
    new_pad, old_pad = PaddingStats(), PaddingStats()
    new_pad.add_plan(plan, lengths)
    old_pad.add_plan(old, lengths)

    assert 1.3 < imbalance(old, lengths) < 1.8  # per-rank planning: ranks wait 25-45% of each step
    assert imbalance(plan, lengths) <= 1.10
    assert micro_imbalance(plan, lengths) <= 1.10
    assert new_pad.ratio <= 0.01 and new_pad.ratio <= old_pad.ratio + 1e-9
    assert len(plan) == steps_per_epoch(len(lengths), world_size, micro_batch, accumulation)


# --- exact cases ----------------------------------------------------------------------------------------------


def test_imbalance_and_padding_by_hand():
    lengths = [300, 100, 200, 200]
    plan = [[[[0]], [[1]]], [[[2]], [[3]]]]  # step 0: 300 vs 100 tokens; step 1: even
    assert rank_positions(plan, lengths) == [[300, 100], [200, 200]]
    assert imbalance(plan, lengths) == pytest.approx((300 / 200 + 1.0) / 2)
    padded = [[[[0, 1]], [[2, 3]]]]  # one step, micro-batches of 2: 2 x 300 positions vs 2 x 200
    assert rank_positions(padded, lengths) == [[600, 400]]
    stats = PaddingStats()
    stats.add_plan(padded, lengths)
    assert (stats.real_tokens, stats.padded_tokens) == (800, 1000) and stats.ratio == pytest.approx(0.2)
    assert imbalance([], lengths) == 1.0


def test_deal_step_pairs_long_with_short_across_micro_batches():
    """Micro-batch 0 of every rank holds the longest examples; whoever got the longest of it gets the shortest next."""
    lengths = [800, 700, 300, 100]
    plan = deal_step([0, 1, 2, 3], lengths, world_size=2, micro_batch=1, accumulation=2)
    assert plan == [[[0], [3]], [[1], [2]]]  # 900 vs 1000 positions; in order (0,1)(2,3) it would be 1100 vs 800


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        plan_epoch([5, 6], world_size=0, micro_batch=1, accumulation=1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="world_size x micro_batch x accumulation = 4"):
        deal_step([0, 1, 2], [1, 2, 3], 2, 2, 1)


def test_leftovers_differ_between_epochs():
    lengths = [(i * 37) % 101 + 5 for i in range(203)]  # 203 = 12 steps of 16 + 11 left over
    dropped = []
    for epoch in range(3):
        plan = plan_epoch(lengths, world_size=2, micro_batch=2, accumulation=4, seed=3, epoch=epoch)
        used = {i for step in plan for rank in step for mb in rank for i in mb}
        dropped.append(set(range(len(lengths))) - used)
    assert all(len(d) == 11 for d in dropped) and len({frozenset(d) for d in dropped}) == 3


def test_sizes_are_keyword_only():
    """A call in the per-rank planner's positional order (micro_batch, accumulation, seed, epoch) fails loudly."""
    with pytest.raises(TypeError):
        plan_epoch([5, 6, 7, 8], 2, 1, 42, 0)


SIZES = {"world_size": 2, "micro_batch": 4, "accumulation": 2}


def test_length_grouping_cuts_padding():
    lengths = [(i * 7919) % 1000 + 10 for i in range(1024)]
    grouped, plain = PaddingStats(), PaddingStats()
    grouped.add_plan(plan_epoch(lengths, **SIZES, seed=0, epoch=0, group_by_length=True), lengths)
    plain.add_plan(plan_epoch(lengths, **SIZES, seed=0, epoch=0, group_by_length=False), lengths)
    assert grouped.ratio < plain.ratio / 3


# --- properties -----------------------------------------------------------------------------------------------

sizes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4))  # world_size, micro_batch, accumulation
lengths_st = st.lists(st.integers(1, 2048), min_size=0, max_size=300)


def sized(size) -> dict[str, int]:
    return dict(zip(("world_size", "micro_batch", "accumulation"), size, strict=True))


def flat(step) -> list[int]:
    return [i for rank in step for mb in rank for i in mb]


@settings(max_examples=200, deadline=None)
@given(lengths_st, sizes, st.integers(0, 10**6), st.integers(0, 5), st.booleans())
def test_plan_shape_and_each_example_at_most_once(lengths, size, seed, epoch, grouped):
    world_size, micro_batch, accumulation = size
    plan = plan_epoch(lengths, **sized(size), seed=seed, epoch=epoch, group_by_length=grouped)
    step_size = world_size * micro_batch * accumulation
    n_steps = steps_per_epoch(len(lengths), world_size, micro_batch, accumulation)
    assert len(plan) == n_steps == len(lengths) // step_size
    for step in plan:
        assert len(step) == world_size
        assert all(len(rank) == accumulation and all(len(mb) == micro_batch for mb in rank) for rank in step)
    used = [i for step in plan for i in flat(step)]
    assert len(used) == len(set(used)) == len(lengths) - len(lengths) % step_size
    assert all(0 <= i < len(lengths) for i in used)
    assert plan == plan_epoch(list(lengths), **sized(size), seed=seed, epoch=epoch, group_by_length=grouped)  # pure


@settings(max_examples=200, deadline=None)
@given(lengths_st, sizes, st.integers(0, 10**6), st.integers(0, 5), st.booleans(), st.randoms(use_true_random=False))
def test_step_sets_depend_only_on_the_global_batch_size(lengths, size, seed, epoch, grouped, rnd):
    """Any split of world_size x micro_batch x accumulation into three factors gives the same steps, in order."""
    world_size, micro_batch, accumulation = size
    factors = [world_size, micro_batch, accumulation]
    other = [1, 1, 1]
    for f in factors:  # the same product, factors moved around at random
        other[rnd.randrange(3)] *= f
    a = plan_epoch(lengths, **sized(factors), seed=seed, epoch=epoch, group_by_length=grouped)
    b = plan_epoch(lengths, **sized(other), seed=seed, epoch=epoch, group_by_length=grouped)
    assert [sorted(flat(s)) for s in a] == [sorted(flat(s)) for s in b]


@settings(max_examples=200, deadline=None)
@given(lengths_st, sizes, st.integers(0, 10**6), st.booleans())
def test_ranks_stay_within_one_length_gap_and_micro_batches_hold_neighbours(lengths, size, seed, grouped):
    """Per step: the busiest and idlest rank differ by at most micro_batch x (longest - shortest example of the
    step), however many micro-batches accumulate; and micro-batch j on any rank is never shorter than j + 1."""
    world_size, micro_batch, accumulation = size
    plan = plan_epoch(lengths, **sized(size), seed=seed, epoch=0, group_by_length=grouped)
    for step, positions in zip(plan, rank_positions(plan, lengths), strict=True):
        step_lengths = [lengths[i] for i in flat(step)]
        assert max(positions) - min(positions) <= micro_batch * (max(step_lengths) - min(step_lengths))
        for j in range(accumulation - 1):
            shortest_here = min(lengths[i] for rank in step for i in rank[j])
            assert shortest_here >= max(lengths[i] for rank in step for i in rank[j + 1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 2048), min_size=64, max_size=300), st.integers(0, 10**6))
def test_epochs_reshuffle(lengths, seed):
    a, b = (plan_epoch(lengths, **sized((2, 2, 2)), seed=seed, epoch=e) for e in (0, 1))
    assert [sorted(flat(s)) for s in a] != [sorted(flat(s)) for s in b]
    counts = Counter(i for step in a for i in flat(step))
    assert set(counts.values()) == {1}
