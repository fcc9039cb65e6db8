"""The scoring task's teacher-cache size check: a shard over Parquet's limit is refused before the
model pass, with advice (the largest top-k and shard size that fit) that is exact."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tasks.score as score_mod
from pocl_core.config import ConfigError
from pocl_core.contracts import RunPaths
from tests.tasks.test_score import config, run_scoring


def test_a_cache_shard_over_the_parquet_limit_is_refused_before_any_shard_with_a_size_that_fits(
        tiny_models, tiny_data_path, tmp_path, monkeypatch):
    """The limit (2^31 values per list column, lowered here) is checked on the shards' token counts up
    front: found mid-pass, lowering shard_size as advised would make the shards already written stale.
    The advised sizes are exact: each of them fits, one more does not (the limit leaves room for a top-k
    of at least the curriculum's temperatures)."""
    monkeypatch.setattr(score_mod, "CACHE_SHARD_VALUES", 1200)
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=big", "scoring.teacher_cache_topk=8")
    pattern = (r"shard 0's teacher cache would hold \d+ response positions × 8 values, over the 1200 .*lower "
               r"scoring.teacher_cache_topk to at most (\d+) or set scoring.shard_size to at most (\d+) \(now 32\)$")
    with pytest.raises(ConfigError, match=pattern) as err:
        run_scoring(cfg)
    assert not list((RunPaths.of(cfg.run_dir).root).rglob("part-*.parquet"))
    fit_topk, fit_size = map(int, re.search(pattern, err.value.args[0]).groups())
    assert 0 < fit_topk < 8 and 0 < fit_size < 32
    with pytest.raises(ConfigError, match="over the 1200"):  # one more than advised is over in some shard
        run_scoring(config(tiny_models, tmp_path, tiny_data_path, "run_name=big",
                           f"scoring.teacher_cache_topk={fit_topk + 1}"))
    with pytest.raises(ConfigError, match="over the 1200"):
        run_scoring(config(tiny_models, tmp_path, tiny_data_path, "run_name=big-size", "scoring.teacher_cache_topk=8",
                           f"scoring.shard_size={fit_size + 1}"))
    run_scoring(config(tiny_models, tmp_path, tiny_data_path, "run_name=big", f"scoring.teacher_cache_topk={fit_topk}"))
    smaller = config(tiny_models, tmp_path, tiny_data_path, "run_name=big-size", "scoring.teacher_cache_topk=8",
                     f"scoring.shard_size={fit_size}")
    run_scoring(smaller)  # exactly the advised size: every shard fits
    assert list((RunPaths.of(smaller.run_dir).teacher_cache_dir).glob("part-*.parquet"))


def test_cache_advice_on_a_scored_run_asks_for_a_new_run_name_with_another_shard_size(
        tiny_models, tiny_data_path, tmp_path, monkeypatch):
    """A run scored without a cache that turns one on: another shard_size would make its shards stale."""
    run_scoring(config(tiny_models, tmp_path, tiny_data_path, "run_name=scored"))
    monkeypatch.setattr(score_mod, "CACHE_SHARD_VALUES", 800)
    with pytest.raises(ConfigError, match=r"shard_size to at most \d+ \(now 32\) with a new run_name: this run "
                                          r"folder's 3 shard\(s\) were scored with shard_size=32"):
        run_scoring(config(tiny_models, tmp_path, tiny_data_path, "run_name=scored", "scoring.teacher_cache_topk=8"))


def test_largest_fitting_shard_size_matches_a_brute_force_search():
    from pocl_core.teacher_cache import largest_fitting_shard_size

    rng = np.random.default_rng(0)
    for _ in range(200):
        positions = rng.integers(0, 30, size=int(rng.integers(1, 40))).tolist()
        per, limit, below = int(rng.integers(1, 5)), int(rng.integers(20, 400)), int(rng.integers(1, 50))
        def fit(s: int) -> bool:
            return all(sum(positions[i:i + s]) * per < limit for i in range(0, len(positions), s))

        expected = 0
        while expected + 1 < below and expected + 1 <= len(positions) and fit(expected + 1):
            expected += 1
        assert largest_fitting_shard_size(positions, per, below, limit) == expected
        assert all(fit(s) for s in range(1, expected + 1))  # "at most" holds for every smaller size
    assert largest_fitting_shard_size([5, 900, 5], 1, 10, limit=100) == 0  # one sample alone is over
    # size 3 fits (0 + 0 + 9 | 9 + 0 + 0) but size 2 does not (0 + 0 | 9 + 9 | ...): the advice is 1
    assert largest_fitting_shard_size([0, 0, 9, 9, 0, 0], 1, 10, limit=10) == 1
