"""Finding the checkpoint to resume from in a run's Ray Train storage.

Ray Train hands the newest reported checkpoint to a restarted run. If that one fails its checksums
(a crash mid-upload, a damaged disk), the older checkpoints of the same storage folder are tried,
newest first, with a warning for each one skipped. The storage is read through the run folder's
filesystem (local folder or object store; see ``pocl_core/storage.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pocl_core.checkpoint import CheckpointError, verify_checkpoint
from pocl_core.storage import Location, ObjectPath, location

EXPERIMENT_NAME = "distill"
log = logging.getLogger("pocl")


def experiment_dir(run_dir: str | Path | ObjectPath) -> Location:
    """Ray Train's folder for the run's distillation job: ``<run>/train/distill``."""
    return location(run_dir) / "train" / EXPERIMENT_NAME


def list_checkpoints(run_dir: str | Path | ObjectPath) -> list[Location]:
    """Checkpoint folders of a run that hold a position, oldest first (by global step)."""
    steps = {}
    for p in experiment_dir(run_dir).glob("checkpoint_*"):
        if p.is_dir() and (p / "position.json").is_file():
            steps[p] = json.loads((p / "position.json").read_text())["global_step"]
    return sorted(steps, key=lambda p: (steps[p], p.name))


def newest_valid_checkpoint(candidates: list[Location]) -> Location | None:
    """The first folder of ``candidates`` (newest first) that passes verification, or None."""
    for folder in candidates:
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; trying the previous one", folder, exc)
    return None
