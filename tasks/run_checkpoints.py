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


def _positions(run_dir: str | Path | ObjectPath) -> dict[Location, dict]:
    """Each checkpoint folder's position.json (folders being built, ``*.tmp``, and unreadable
    positions are left out; the latter with a warning: a damaged checkpoint is never resumed)."""
    found = {}
    for p in experiment_dir(run_dir).glob("checkpoint_*"):
        if p.name.endswith(".tmp") or not p.is_dir() or not (p / "position.json").is_file():
            continue
        try:
            position = json.loads((p / "position.json").read_text())
            int(position["global_step"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("skipping checkpoint %s: unreadable position.json (%s)", p, exc)
            continue
        found[p] = position
    return found


def list_checkpoints(run_dir: str | Path | ObjectPath) -> list[Location]:
    """Checkpoint folders of a run that hold a readable position, oldest first (by global step)."""
    positions = _positions(run_dir)
    return sorted(positions, key=lambda p: (int(positions[p]["global_step"]), p.name))


def foreign_checkpoints(run_dir: str | Path | ObjectPath, train_key: str) -> list[Location]:
    """Checkpoint folders of the run written under another training key (another recipe or inputs)."""
    return [p for p, pos in _positions(run_dir).items() if pos.get("train_key") != train_key]


def newest_valid_checkpoint(candidates: list[Location]) -> Location | None:
    """The first folder of ``candidates`` (newest first) that passes verification, or None."""
    for folder in candidates:
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; trying the previous one", folder, exc)
    return None
