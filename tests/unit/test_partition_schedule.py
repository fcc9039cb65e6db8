import numpy as np
import pytest

from pocl_core.config import CurriculumConfig
from pocl_core.difficulty import fuse_difficulty
from pocl_core.partition import bucket_sizes, partition_by_rank, stage_members
from pocl_core.schedule import (build_schedule, linear_values, plan_stages, schedule_temperatures, stage_batches,
                                stage_num_steps)


@pytest.mark.parametrize("n, k", [(100, 4), (101, 4), (3, 4), (0, 3), (7, 1)])
def test_bucket_sizes_are_equal_slices(n, k):
    sizes = bucket_sizes(n, k)
    assert sum(sizes) == n and len(sizes) == k and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("strategy", ["curriculum", "anti", "random"])
def test_partition_sizes_and_cumulative_membership(strategy):
    n, k = 103, 4
    ranks = np.random.default_rng(0).permutation(n)
    buckets = partition_by_rank(ranks, k, strategy, seed=3)
    assert buckets.dtype == np.int16
    assert sorted(np.bincount(buckets, minlength=k).tolist(), reverse=True) == bucket_sizes(n, k)
    for s in range(k):
        members = stage_members(buckets, s)
        assert set(members) == {i for i in range(n) if buckets[i] <= s}
        assert len(members) == sum(bucket_sizes(n, k)[: s + 1])
    if strategy == "curriculum":  # bucket order follows rank order
        assert all(ranks[buckets == b].max() < ranks[buckets == b + 1].min() for b in range(k - 1))
    if strategy == "anti":
        assert all(ranks[buckets == b].min() > ranks[buckets == b + 1].max() for b in range(k - 1))


def test_random_partition_is_seeded_and_not_the_curriculum():
    ranks = np.arange(200)
    a = partition_by_rank(ranks, 4, "random", seed=1)
    assert np.array_equal(a, partition_by_rank(ranks, 4, "random", seed=1))
    assert not np.array_equal(a, partition_by_rank(ranks, 4, "random", seed=2))
    assert not np.array_equal(a, partition_by_rank(ranks, 4, "curriculum"))


def test_partition_rejects_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        partition_by_rank([0, 1], 2, "sideways")
    with pytest.raises(ValueError, match="permutation"):
        partition_by_rank([0, 0, 1], 2)


def test_single_measure_rank_ties_broken_by_id():
    ids = ["c", "a", "b", "d"]
    difficulty, rank = fuse_difficulty(ids, {"nll": [2.0, 1.0, 1.0, 0.5]})
    assert difficulty.tolist() == [2.0, 1.0, 1.0, 0.5]
    # easiest first: d (0.5), then a and b tie at 1.0 -> a before b, then c
    assert rank.tolist() == [3, 1, 2, 0]


def test_reference_schedule_table():
    plans = build_schedule(CurriculumConfig(num_stages=4, epochs_per_stage=8))
    assert [p.buckets for p in plans] == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert np.allclose([p.temperature for p in plans], [1.0, 4 / 3, 5 / 3, 2.0])
    assert np.allclose([p.kd_weight for p in plans], [0.7, 0.8, 0.9, 1.0])
    assert all(p.epochs == 8 for p in plans)
    explicit = build_schedule(CurriculumConfig(num_stages=2, temperatures=[1.0, 1.5], kd_weights=[0.5, 0.6]))
    assert [(p.temperature, p.kd_weight) for p in explicit] == [(1.0, 0.5), (1.5, 0.6)]
    assert linear_values(3.0, 9.0, 1) == [3.0]


def test_schedule_temperatures_cover_every_strategy_once():
    paper = CurriculumConfig(num_stages=4, epochs_per_stage=8)
    assert np.allclose(schedule_temperatures(paper), [1.0, 4 / 3, 5 / 3, 2.0])
    baseline = CurriculumConfig(num_stages=2, temperatures=[2.0, 1.5], baseline_temperature=3.0, strategy="none")
    assert schedule_temperatures(baseline) == (1.5, 2.0, 3.0)  # ascending; the stages' too under strategy=none
    for strategy in ("curriculum", "none", "anti", "random"):
        cfg = CurriculumConfig(num_stages=3, strategy=strategy, temperature_start=1.2, temperature_end=1.8)
        plans = plan_stages(cfg, [4, 4, 4], 4)
        assert {p.temperature for p in plans} <= set(schedule_temperatures(cfg))


def test_stage_batches_cover_members_every_epoch_and_resume_midway():
    members = np.arange(10, 33)  # 23 samples
    batches = list(stage_batches(members, num_steps=6, global_batch=8, seed=5, stage=1))
    assert len(batches) == stage_num_steps(23, 2, 8) == 6
    assert all(len(idx) == 8 for _, idx in batches)
    for epoch in range(2):
        seen = np.concatenate([idx for step, idx in batches[epoch * 3:(epoch + 1) * 3]])
        assert set(seen) == set(members)  # wrap-around only repeats the epoch's own samples
    resumed = list(stage_batches(members, num_steps=6, global_batch=8, seed=5, stage=1, start_step=4))
    assert [s for s, _ in resumed] == [4, 5]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(resumed, batches[4:]))
    other_stage = list(stage_batches(members, num_steps=3, global_batch=8, seed=5, stage=2))
    assert not np.array_equal(other_stage[0][1], batches[0][1])
    # each epoch is a fresh shuffle (the first 23 of its 24 slots are its order), and the seed moves it
    orders = [np.concatenate([idx for _, idx in batches[e * 3:(e + 1) * 3]])[:23] for e in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(members) and not np.array_equal(orders[0], orders[1])
    other_seed = list(stage_batches(members, num_steps=6, global_batch=8, seed=6, stage=1))
    assert all(not np.array_equal(a, b) for (_, a), (_, b) in zip(other_seed, batches))


def test_plan_stages_counts_and_the_plain_kd_baseline_has_the_same_budget():
    sizes = bucket_sizes(103, 4)  # 26, 26, 26, 25
    cfg = CurriculumConfig(num_stages=4, epochs_per_stage=2)
    plans = plan_stages(cfg, sizes, global_batch=8)
    assert [p.num_samples for p in plans] == [26, 52, 78, 103]
    assert [p.num_steps for p in plans] == [2 * 4, 2 * 7, 2 * 10, 2 * 13]
    base = plan_stages(CurriculumConfig(num_stages=4, epochs_per_stage=2, strategy="none", baseline_temperature=1.5,
                                        baseline_kd_weight=0.6), sizes, global_batch=8)
    assert len(base) == 1 and base[0].buckets == (0, 1, 2, 3) and base[0].num_samples == 103
    assert base[0].num_steps == sum(p.num_steps for p in plans)
    assert (base[0].temperature, base[0].kd_weight) == (1.5, 0.6)
    assert base[0].epochs * 13 >= base[0].num_steps > (base[0].epochs - 1) * 13
    with pytest.raises(ValueError, match="buckets"):
        plan_stages(cfg, sizes[:3], 8)
