"""The POCL stage schedule: which buckets, temperature and KD weight each stage uses, and its batches.

Stage s (0-based, K stages) trains ``epochs_per_stage`` epochs on buckets 0..s, with temperature
T_s and KD weight λ_s taken from explicit lists or linearly from start to end:
``v_s = start + (end − start)·s/(K − 1)`` (``start`` when K = 1). The reference recipe (K = 4,
T 1 → 2, λ 0.7 → 1) gives T = 1, 1.33, 1.67, 2 and λ = 0.7, 0.8, 0.9, 1.0.

Batches: each epoch shuffles the stage's members with a seed derived from (shuffle_seed, stage,
epoch), so any step of any stage can be recomputed on resume. An epoch has ceil(n / global_batch)
steps; the last batch is filled by wrapping to the start of the epoch's order, so every step has
exactly ``global_batch`` samples (equal shards across workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pocl_core.config import CurriculumConfig


@dataclass(frozen=True)
class StagePlan:
    stage: int
    buckets: tuple[int, ...]
    temperature: float
    kd_weight: float
    epochs: int


def linear_values(start: float, end: float, num: int) -> list[float]:
    """``num`` values from start to end inclusive (``[start]`` when num = 1)."""
    if num == 1:
        return [float(start)]
    return [float(start + (end - start) * s / (num - 1)) for s in range(num)]


def build_schedule(cfg: CurriculumConfig) -> list[StagePlan]:
    """The per-stage plan of a curriculum config."""
    k = cfg.num_stages
    temps = cfg.temperatures or linear_values(cfg.temperature_start, cfg.temperature_end, k)
    weights = cfg.kd_weights or linear_values(cfg.kd_weight_start, cfg.kd_weight_end, k)
    return [
        StagePlan(stage=s, buckets=tuple(range(s + 1)), temperature=float(temps[s]),
                  kd_weight=float(weights[s]), epochs=cfg.epochs_per_stage)
        for s in range(k)
    ]


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return math.ceil(num_samples / global_batch) if num_samples else 0


def stage_num_steps(num_samples: int, epochs: int, global_batch: int) -> int:
    """Optimizer steps of one stage."""
    return epochs * steps_per_epoch(num_samples, global_batch)


def epoch_order(members: Sequence[int], seed: int, stage: int, epoch: int) -> np.ndarray:
    """A seeded shuffle of ``members`` for (stage, epoch)."""
    rng = np.random.default_rng([seed, stage, epoch])
    return np.asarray(members, dtype=np.int64)[rng.permutation(len(members))]


def stage_batches(members: Sequence[int], epochs: int, global_batch: int, seed: int, stage: int,
                  start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (step_in_stage, sample indices [global_batch]) from ``start_step`` on."""
    per_epoch = steps_per_epoch(len(members), global_batch)
    for step in range(start_step, epochs * per_epoch):
        epoch, i = divmod(step, per_epoch)
        order = epoch_order(members, seed, stage, epoch)
        idx = np.arange(i * global_batch, (i + 1) * global_batch) % len(order)
        yield step, order[idx]
