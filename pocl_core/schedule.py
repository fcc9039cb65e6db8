"""The POCL stage schedule: which buckets, temperature and KD weight each stage uses, and its batches.

Stage s (0-based, K stages) trains ``epochs_per_stage`` epochs on buckets 0..s, with temperature
T_s and KD weight λ_s taken from explicit lists or linearly from start to end:
``v_s = start + (end − start)·s/(K − 1)`` (``start`` when K = 1). The reference recipe (K = 4,
T 1 → 2, λ 0.7 → 1) gives T = 1, 1.33, 1.67, 2 and λ = 0.7, 0.8, 0.9, 1.0.

``plan_stages`` adds the data: the number of samples and optimizer steps of each stage, given the
bucket sizes. Strategy ``none`` (plain KD, the baseline) becomes a single stage over all buckets
with as many steps as the staged schedule would take (the same sample budget).

Batches: each epoch shuffles the stage's members with a seed derived from (shuffle_seed, stage,
epoch), so any step of any stage can be recomputed on resume. An epoch has ceil(n / global_batch)
steps; the last batch is filled by wrapping to the start of the epoch's order, so every step has
exactly ``global_batch`` samples (equal shards across workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

from pocl_core.config import CurriculumConfig


@dataclass(frozen=True)
class StagePlan:
    """One stage: its buckets, temperature T, KD weight λ, epochs, and (after plan_stages) its size."""

    stage: int
    buckets: tuple[int, ...]
    temperature: float
    kd_weight: float
    epochs: int
    num_samples: int = 0
    num_steps: int = 0


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


def schedule_temperatures(cfg: CurriculumConfig) -> tuple[float, ...]:
    """Every KD temperature this curriculum can train at, whatever its strategy: each stage's and the
    plain-KD baseline's, ascending, each once (the temperatures a teacher cache stores tails for)."""
    return tuple(sorted({plan.temperature for plan in build_schedule(cfg)} | {float(cfg.baseline_temperature)}))


def plan_stages(cfg: CurriculumConfig, bucket_sizes: Sequence[int], global_batch: int) -> list[StagePlan]:
    """The stages actually trained, with sample and step counts, for buckets of the given sizes."""
    if len(bucket_sizes) != cfg.num_stages:
        raise ValueError(f"{len(bucket_sizes)} buckets for curriculum.num_stages={cfg.num_stages}")
    staged = []
    for plan in build_schedule(cfg):
        n = int(sum(bucket_sizes[: plan.stage + 1]))
        staged.append(replace(plan, num_samples=n, num_steps=stage_num_steps(n, plan.epochs, global_batch)))
    if cfg.strategy != "none":
        return staged
    total = int(sum(bucket_sizes))
    steps = sum(p.num_steps for p in staged)
    per_epoch = steps_per_epoch(total, global_batch)
    return [StagePlan(stage=0, buckets=tuple(range(cfg.num_stages)), temperature=cfg.baseline_temperature,
                      kd_weight=cfg.baseline_kd_weight, epochs=math.ceil(steps / per_epoch) if per_epoch else 0,
                      num_samples=total, num_steps=steps)]


def num_trained_stages(cfg: CurriculumConfig) -> int:
    """How many stages actually run: 1 for the plain-KD baseline (``none``), else num_stages."""
    return 1 if cfg.strategy == "none" else cfg.num_stages


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return math.ceil(num_samples / global_batch) if num_samples else 0


def stage_num_steps(num_samples: int, epochs: int, global_batch: int) -> int:
    """Optimizer steps of one stage."""
    return epochs * steps_per_epoch(num_samples, global_batch)


def epoch_order(members: Sequence[int], seed: int, stage: int, epoch: int) -> np.ndarray:
    """A seeded shuffle of ``members`` for (stage, epoch)."""
    rng = np.random.default_rng([seed, stage, epoch])
    return np.asarray(members, dtype=np.int64)[rng.permutation(len(members))]


def stage_batches(members: Sequence[int], num_steps: int, global_batch: int, seed: int, stage: int,
                  start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (step_in_stage, sample indices [global_batch]) for steps ``start_step``..num_steps-1."""
    per_epoch = steps_per_epoch(len(members), global_batch)
    for step in range(start_step, num_steps):
        epoch, i = divmod(step, per_epoch)
        order = epoch_order(members, seed, stage, epoch)
        idx = np.arange(i * global_batch, (i + 1) * global_batch) % len(order)
        yield step, order[idx]
