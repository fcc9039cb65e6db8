"""Finding the checkpoint to resume from in a run's Ray Train storage.

Ray Train hands the newest reported checkpoint to a restarted run. If that one fails its checksums
(a crash mid-upload, a damaged disk), the older checkpoints of the same storage folder are tried,
newest first, with a warning for each one skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pocl_core.checkpoint import CheckpointError, verify_checkpoint

EXPERIMENT_NAME = "distill"
log = logging.getLogger("pocl")


def experiment_dir(run_dir: str | Path) -> Path:
    """Ray Train's folder for the run's distillation job: ``<run>/train/distill``."""
    return Path(run_dir) / "train" / EXPERIMENT_NAME


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run that hold a position, oldest first (by global step)."""
    folders = [p for p in experiment_dir(run_dir).glob("checkpoint_*") if p.is_dir() and (p / "position.json").is_file()]
    return sorted(folders, key=lambda p: (json.loads((p / "position.json").read_text())["global_step"], p.name))


def newest_valid_checkpoint(candidates: list[Path]) -> Path | None:
    """The first folder of ``candidates`` (newest first) that passes verification, or None."""
    for folder in candidates:
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; trying the previous one", folder, exc)
    return None
