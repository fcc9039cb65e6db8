"""From per-sample measures to one difficulty and an easy → hard rank.

``single``: difficulty is the first measure (negated when lower means harder).
``rrf``: reciprocal rank fusion (the method, k = 60): per measure, rank the samples easy → hard
(rank_m = 1 for the easiest: lowest ``nll``, highest ``rouge_l``; see ``HIGHER_IS_HARDER``), then
score = Σ_m 1/(k + rank_m); sorting by score descending gives the easy → hard order, and
difficulty = −score (higher = harder).

Ties: samples with equal values of a measure share that measure's rank, the mean of the ranks
they span (a measure that cannot tell two samples apart gives them the same term, so it never
orders them: with rouge_l 0 for many samples, their order comes from the other measures alone).
Samples with equal fused scores (or equal values under ``single``) are ordered by sample_id, so the
order never depends on file position. The terms of each sample's score are summed in a canonical
order, so equal multisets of ranks give bit-identical scores (a tie stays a tie with any number of
measures).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pocl_core.measures import HIGHER_IS_HARDER


def _easy_first_ranks(sample_ids: Sequence[str], values: np.ndarray, higher_is_harder: bool) -> np.ndarray:
    """1-based rank per sample, 1 = easiest; ties by sample_id."""
    key = values if higher_is_harder else -values
    order = sorted(range(len(sample_ids)), key=lambda i: (key[i], sample_ids[i]))
    ranks = np.empty(len(sample_ids), dtype=np.int64)
    ranks[order] = np.arange(1, len(sample_ids) + 1)
    return ranks


def _easy_first_shared_ranks(values: np.ndarray, higher_is_harder: bool) -> np.ndarray:
    """1-based rank per sample, 1 = easiest; equal values share the mean of the ranks they span
    (float64 [N]; e.g. values 1, 2, 2, 3 with lower = easier give 1, 2.5, 2.5, 4)."""
    key = values if higher_is_harder else -values
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each group
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2  # mean of ranks start+1 .. end
    return ranks


def fuse_difficulty(sample_ids: Sequence[str], measures: Mapping[str, Sequence[float]], fusion: str = "single",
                    rrf_k: int = 60, higher_is_harder: Mapping[str, bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Combine measures into (difficulty float64 [N], rank int64 [N], 0 = easiest).

    ``measures`` maps a measure name to one value per sample (aligned with ``sample_ids``).
    """
    if not measures:
        raise ValueError("fuse_difficulty: no measures given")
    n = len(sample_ids)
    direction = dict(HIGHER_IS_HARDER)
    direction.update(higher_is_harder or {})
    arrays = {}
    for name, vals in measures.items():
        arr = np.asarray(vals, dtype=np.float64)
        if arr.shape != (n,):
            raise ValueError(f"measure '{name}' has {arr.shape[0]} values for {n} samples")
        if name not in direction:
            raise ValueError(f"measure '{name}' has no known direction (higher_is_harder)")
        if np.isnan(arr).any():
            raise ValueError(f"measure '{name}' has NaN for sample '{sample_ids[int(np.isnan(arr).argmax())]}'")
        arrays[name] = arr
    if fusion == "single":
        name = next(iter(arrays))
        difficulty = arrays[name] if direction[name] else -arrays[name]
    elif fusion == "rrf":
        terms = np.stack([1.0 / (rrf_k + _easy_first_shared_ranks(arr, direction[name]))
                          for name, arr in arrays.items()])
        score = np.zeros(n)
        for row in np.sort(terms, axis=0):  # canonical summation order per sample
            score += row
        difficulty = -score
    else:
        raise ValueError(f"unknown fusion '{fusion}' (use 'single' or 'rrf')")
    rank = _easy_first_ranks(sample_ids, difficulty, True) - 1
    return difficulty, rank
