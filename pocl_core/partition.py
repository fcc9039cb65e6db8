"""Partition ranked samples into K buckets (0 = first trained) by strategy.

``curriculum``: bucket by rank, easy → hard. ``anti``: hard → easy. ``random``: a seeded shuffle of
the ranks before slicing (the ablation). ``none`` (plain KD) buckets like ``curriculum``; the
schedule then trains on all buckets at once and uses them only to size the sample budget. Buckets are equal slices; when N is not divisible by K the
first N mod K buckets get one extra sample. Stage s trains on buckets 0..s (cumulative).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

STRATEGIES = ("curriculum", "anti", "random", "none")


def bucket_sizes(n: int, num_buckets: int) -> list[int]:
    """Sizes of K equal slices of n items (the first n mod K get one more)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    base, extra = divmod(n, num_buckets)
    return [base + (1 if b < extra else 0) for b in range(num_buckets)]


def partition_by_rank(ranks: Sequence[int], num_buckets: int, strategy: str = "curriculum",
                      seed: int = 10) -> np.ndarray:
    """Bucket per sample (int16 [N]) from its easy-first rank (0 = easiest, a permutation of 0..N-1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown partition strategy '{strategy}'; choose one of {STRATEGIES}")
    ranks = np.asarray(ranks, dtype=np.int64)
    n = len(ranks)
    if n and not np.array_equal(np.sort(ranks), np.arange(n)):
        raise ValueError("ranks must be a permutation of 0..N-1")
    if strategy in ("curriculum", "none"):
        position = ranks
    elif strategy == "anti":
        position = n - 1 - ranks
    else:
        position = np.random.default_rng(seed).permutation(n)[ranks]
    bounds = np.cumsum(bucket_sizes(n, num_buckets))
    return np.searchsorted(bounds, position, side="right").astype(np.int16)


def stage_members(buckets: np.ndarray, stage: int) -> np.ndarray:
    """Indices of the samples stage ``stage`` trains on: buckets 0..stage."""
    return np.flatnonzero(np.asarray(buckets) <= stage)
