"""The POCL distillation flow: load → score → partition → distill (Ray Train) → evaluate → report.

Run it with ``pocl run --config configs/tiny.yaml [key=value ...]`` or
``python -m flows.pipeline --config configs/tiny.yaml [key=value ...]``. Starting it again with the
same run name reuses every finished step and resumes training from its newest checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from prefect import flow

from pocl_core.config import PoclConfig, load_config
from pocl_core.contracts import RunPaths, write_text_atomic
from tasks.distill import distill
from tasks.evaluate import evaluate
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.report import report
from tasks.score import score_difficulty


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    student: str
    report: str
    metrics: str


def resolve_config(config_path: Optional[str], overrides: Optional[list[str]], run_name: Optional[str]) -> PoclConfig:
    """The config file plus overrides; ``run_name`` (when given) wins over both."""
    extra = list(overrides or [])
    if run_name:
        extra.append(f"run_name={run_name}")
    return load_config(config_path, extra).with_absolute_paths()


@flow(name="pocl-distill", log_prints=True)
def pocl_distill(config_path: str = "configs/tiny.yaml", overrides: Optional[list[str]] = None,
                 run_name: Optional[str] = None) -> RunSummary:
    """Distil the configured teacher into the student with the POCL curriculum; returns the run's paths."""
    cfg = resolve_config(config_path, overrides, run_name)
    paths = RunPaths.of(cfg.run_dir)
    write_text_atomic(paths.config, cfg.to_yaml())
    data = load_dataset(cfg)
    scores = score_difficulty(cfg, data)
    partition_path = partition(cfg, scores)
    student = distill(cfg, data, partition_path, scores.teacher_cache_dir)
    metrics = evaluate(cfg, data, student)
    report_path = report(cfg, metrics, partition_path)
    return RunSummary(run_dir=str(paths.root), student=student, report=report_path, metrics=metrics)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
