"""From per-sample measures to one difficulty and an easy → hard rank.

``single``: difficulty is the first measure (negated when lower means harder).
``rrf``: reciprocal rank fusion (the method, k = 60): per measure, rank the samples easy → hard
(rank_m = 1 for the easiest: lowest ``nll``, highest ``rouge_l``; see ``HIGHER_IS_HARDER``), then
score = Σ_m 1/(k + rank_m); sorting by score descending gives the easy → hard order, and
difficulty = −score (higher = harder).

Ties are broken by sample_id, so the order never depends on file position: samples with equal
values of a measure get consecutive ranks in sample_id order, and samples with equal fused scores
are ordered by sample_id. The terms of each sample's score are summed in a canonical order, so
equal multisets of ranks give bit-identical scores (a tie stays a tie with any number of measures).
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
        terms = np.stack([1.0 / (rrf_k + _easy_first_ranks(sample_ids, arr, direction[name]))
                          for name, arr in arrays.items()])
        score = np.zeros(n)
        for row in np.sort(terms, axis=0):  # canonical summation order per sample
            score += row
        difficulty = -score
    else:
        raise ValueError(f"unknown fusion '{fusion}' (use 'single' or 'rrf')")
    rank = _easy_first_ranks(sample_ids, difficulty, True) - 1
    return difficulty, rank
