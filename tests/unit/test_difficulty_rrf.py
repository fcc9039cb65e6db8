"""Reciprocal rank fusion against hand-computed numbers, ties, direction and order independence."""

from __future__ import annotations

import numpy as np
import pytest

from pocl_core.difficulty import fuse_difficulty


def test_rrf_matches_hand_computed_scores_and_order():
    # Five samples. nll: lower = easier; rouge_l: higher = easier. Easy-first ranks (1 = easiest):
    #   id   nll  rank_nll   rouge  rank_rouge   score = 1/(60+rank_nll) + 1/(60+rank_rouge)
    #   a    0.5     1        0.10      4         1/61 + 1/64 = 0.0320184426...
    #   b    2.0     4        0.90      1         1/64 + 1/61 = 0.0320184426... (tie with a)
    #   c    1.0     2        0.80      2         1/62 + 1/62 = 0.0322580645...
    #   d    3.0     5        0.05      5         1/65 + 1/65 = 0.0307692307...
    #   e    1.5     3        0.50      3         1/63 + 1/63 = 0.0317460317...
    # Sorted by score descending (ties by sample_id): c, a, b, e, d.
    ids = ["a", "b", "c", "d", "e"]
    measures = {"nll": [0.5, 2.0, 1.0, 3.0, 1.5], "rouge_l": [0.10, 0.90, 0.80, 0.05, 0.50]}
    difficulty, rank = fuse_difficulty(ids, measures, "rrf", rrf_k=60)
    expected_score = {"a": 1 / 61 + 1 / 64, "b": 1 / 64 + 1 / 61, "c": 2 / 62, "d": 2 / 65, "e": 2 / 63}
    np.testing.assert_allclose(-difficulty, [expected_score[i] for i in ids], rtol=0, atol=1e-15)
    assert -difficulty[2] == pytest.approx(0.0322580645, abs=1e-10)
    assert difficulty[0] == difficulty[1]  # an exact tie, whatever the summation order
    order = [ids[i] for i in np.argsort(rank)]
    assert order == ["c", "a", "b", "e", "d"]
    assert rank.dtype == np.int64 and sorted(rank.tolist()) == [0, 1, 2, 3, 4]


def test_rrf_constant_k_changes_the_scores():
    ids = ["a", "b", "c"]
    measures = {"nll": [1.0, 2.0, 3.0], "rouge_l": [0.2, 0.9, 0.1]}
    difficulty, _ = fuse_difficulty(ids, measures, "rrf", rrf_k=1)
    # ranks: nll a1 b2 c3; rouge b1 a2 c3
    np.testing.assert_allclose(-difficulty, [1 / 2 + 1 / 3, 1 / 3 + 1 / 2, 1 / 4 + 1 / 4])


def test_ties_within_a_measure_share_the_mean_rank_and_equal_scores_go_by_sample_id():
    # Equal nll for x and y, equal rouge for x and y: each measure gives both rank (2 + 3) / 2 = 2.5.
    ids = ["y", "x", "z"]
    measures = {"nll": [1.0, 1.0, 0.5], "rouge_l": [0.5, 0.5, 0.9]}
    difficulty, rank = fuse_difficulty(ids, measures, "rrf", rrf_k=60)
    # z: 1/61 + 1/61; x and y: 1/62.5 + 1/62.5 each, an exact tie, ordered by sample_id (x before y)
    np.testing.assert_allclose(-difficulty, [2 / 62.5, 2 / 62.5, 2 / 61], rtol=0, atol=1e-15)
    assert difficulty[0] == difficulty[1]
    assert rank.tolist() == [2, 1, 0]


def test_a_measure_that_ties_everywhere_leaves_the_order_to_the_others():
    # rouge_l 0 for all three (no generation overlapped): only nll orders them, easiest (lowest) first.
    difficulty, rank = fuse_difficulty(["a", "b", "c"], {"nll": [3.0, 2.0, 1.0], "rouge_l": [0.0, 0.0, 0.0]}, "rrf")
    assert rank.tolist() == [2, 1, 0]
    np.testing.assert_allclose(-difficulty, [1 / 63 + 1 / 62, 1 / 62 + 1 / 62, 1 / 61 + 1 / 62], rtol=0, atol=1e-15)


def _mean_ranks_by_counting(values, higher_is_harder):
    """Independent reference: rank = 1 + #easier + (#equal others) / 2."""
    key = np.asarray(values) if higher_is_harder else -np.asarray(values)
    return np.array([1 + (key < v).sum() + ((key == v).sum() - 1) / 2 for v in key])


@pytest.mark.parametrize("seed", range(5))
def test_shared_ranks_match_counting_on_random_values_with_many_ties(seed):
    from pocl_core.difficulty import _easy_first_shared_ranks

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, 40).astype(float)
    for harder in (True, False):
        got = _easy_first_shared_ranks(values, harder)
        np.testing.assert_array_equal(got, _mean_ranks_by_counting(values, harder))
        assert got.sum() == 40 * 41 / 2  # ties move no weight between samples
    assert _easy_first_shared_ranks(np.array([]), True).shape == (0,)


def test_equal_fused_scores_from_many_measures_stay_tied():
    # Three measures; every sample's ranks are a permutation of (1, 2, 3):
    #   p: (1, 2, 3), q: (3, 1, 2), r: (2, 3, 1)  ->  all scores 1/61 + 1/62 + 1/63, bit-equal,
    # so the order is by sample_id alone.
    ids = ["q", "p", "r"]
    measures = {"nll": [3.0, 1.0, 2.0], "m2": [1.0, 2.0, 3.0], "m3": [2.0, 3.0, 1.0]}
    difficulty, rank = fuse_difficulty(ids, measures, "rrf", higher_is_harder={"m2": True, "m3": True})
    assert difficulty[0] == difficulty[1] == difficulty[2]
    assert -difficulty[0] == pytest.approx(1 / 61 + 1 / 62 + 1 / 63, abs=1e-15)
    assert rank.tolist() == [1, 0, 2]


@pytest.mark.parametrize("fusion", ["single", "rrf"])
def test_fusion_depends_on_ids_not_on_input_order(fusion):
    rng = np.random.default_rng(0)
    n = 50
    ids = [f"s{i:03d}" for i in range(n)]
    measures = {"nll": rng.integers(0, 5, n).astype(float), "rouge_l": rng.integers(0, 3, n) / 3}
    d0, r0 = fuse_difficulty(ids, measures, fusion)
    perm = rng.permutation(n)
    d1, r1 = fuse_difficulty([ids[i] for i in perm], {m: np.asarray(v)[perm] for m, v in measures.items()}, fusion)
    assert dict(zip(ids, r0.tolist())) == {ids[i]: int(r) for i, r in zip(perm, r1)}
    assert dict(zip(ids, d0.tolist())) == {ids[i]: float(d) for i, d in zip(perm, d1)}


def test_rouge_alone_ranks_highest_first_and_errors_name_the_problem():
    difficulty, rank = fuse_difficulty(["a", "b"], {"rouge_l": [0.2, 0.8]})
    assert rank.tolist() == [1, 0] and difficulty.tolist() == [-0.2, -0.8]
    with pytest.raises(ValueError, match="no known direction"):
        fuse_difficulty(["a"], {"mystery": [1.0]})
    with pytest.raises(ValueError, match="NaN for sample 'b'"):
        fuse_difficulty(["a", "b"], {"nll": [1.0, float("nan")]}, "rrf")
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_difficulty(["a"], {"nll": [1.0]}, "borda")
