"""Finding the checkpoint to resume from in a run's Ray Train storage.

Ray Train hands the newest reported checkpoint to a restarted run. If that one fails its checksums
(a crash mid-upload, a damaged disk), the older checkpoints of the same storage folder are tried,
newest first, with a warning for each one skipped. When training has finished, ``prune_checkpoints``
removes what Ray Train's own pruning never sees. The storage is read through the run folder's
filesystem (local folder or object store; see ``pocl_core/storage.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pocl_core.checkpoint import CheckpointError, check_complete, verify_checkpoint
from pocl_core.storage import Location, ObjectPath, download_dir, location, remove_tree

EXPERIMENT_NAME = "distill"
# Ray Train's record of the checkpoints it registered, in the experiment folder (Ray 2.60)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
log = logging.getLogger("pocl")


def experiment_dir(run_dir: str | Path | ObjectPath) -> Location:
    """Ray Train's folder for the run's distillation job: ``<run>/train/distill``."""
    return location(run_dir) / "train" / EXPERIMENT_NAME


def _positions(run_dir: str | Path | ObjectPath) -> dict[Location, dict]:
    """Each complete checkpoint folder's position.json. Left out: folders being built (``*.tmp``),
    those an interrupted write or copy left without a complete manifest (a manifest that is missing
    or names a file that is not there; Ray Train copies a checkpoint's files in no fixed order), and,
    with a warning, unreadable positions: such a checkpoint is never resumed or counted as kept."""
    found = {}
    for p in experiment_dir(run_dir).glob("checkpoint_*"):
        if p.name.endswith(".tmp") or not p.is_dir() or not (p / "position.json").is_file():
            continue
        try:
            check_complete(p)
        except CheckpointError as exc:
            log.info("ignoring checkpoint %s, an interrupted write: %s", p, exc)
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
    """Complete checkpoint folders of a run (see ``_positions``), oldest first (by global step)."""
    positions = _positions(run_dir)
    return sorted(positions, key=lambda p: (int(positions[p]["global_step"]), p.name))


def foreign_checkpoints(run_dir: str | Path | ObjectPath, train_key: str) -> list[Location]:
    """Checkpoint folders of the run written under another training key (another recipe or inputs)."""
    return [p for p, pos in _positions(run_dir).items() if pos.get("train_key") != train_key]


def newest_verified_copy(candidates: list[Location], scratch: Callable[[], Path]) -> tuple[Location, Path] | None:
    """The first folder of ``candidates`` (newest first) that passes verification, with a local folder
    holding its files; None when none passes (each one skipped named in a warning).

    A local candidate is its own local folder. One in an object store is downloaded whole into a new
    folder from ``scratch()`` and verified there, so each of its files crosses the network once (not
    once to verify and again to load); the copy of a candidate that fails is removed at once. An
    error of the store itself (OSError) is raised, not taken for a damaged checkpoint.
    """
    for folder in candidates:
        remote = isinstance(folder, ObjectPath)
        local = download_dir(folder, scratch()) if remote else Path(folder)
        try:
            verify_checkpoint(local)
            return folder, local
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; trying the previous one", folder,
                        str(exc).replace(str(local), str(folder)))  # name the stored folder, not the copy
            if remote:
                shutil.rmtree(local, ignore_errors=True)
    return None


@contextmanager
def named_as_stored(local: Path | str, stored: Location) -> Iterator[None]:
    """An error raised in the block that names ``local``, the temporary copy of the checkpoint
    ``stored``, names ``stored`` instead (the copy is deleted by the time anyone reads the message)."""
    try:
        yield
    except (RuntimeError, ValueError, OSError) as exc:
        text = str(exc)
        if str(local) == str(stored) or str(local) not in text:
            raise
        text = text.replace(str(local), f"{stored} (read from a local copy)")
        if isinstance(exc, OSError) and exc.errno is not None:  # keep errno; the file named as stored
            name = str(exc.filename).replace(str(local), str(stored)) if exc.filename is not None else None
            raise type(exc)(exc.errno, exc.strerror, name) from exc
        try:
            renamed = type(exc)(text)
        except TypeError:
            renamed = None
        if renamed is None or str(renamed) != text:  # a type with arguments of its own: keep it, add a note
            exc.add_note(f"(the checkpoint is {stored}; {local} was its local copy)")
            raise
        raise renamed from exc


def ray_registered_checkpoints(run_dir: str | Path | ObjectPath) -> set[str] | None:
    """Names of the checkpoint folders in Ray Train's run snapshot (empty when there is none: local
    mode, or no report yet); None, with a warning, when the snapshot cannot be read."""
    snapshot = experiment_dir(run_dir) / RAY_SNAPSHOT
    try:
        if not snapshot.is_file():
            return set()
        state = json.loads(snapshot.read_text())
        results = [*state.get("checkpoint_results", []), state.get("latest_checkpoint_result") or {}]
        return {str(r["checkpoint_dir_name"]) for r in results if r}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("could not read Ray Train's run snapshot %s (%s): no checkpoint is pruned", snapshot, exc)
        return None


def prune_checkpoints(run_dir: str | Path | ObjectPath, used: Location, keep: int | None) -> list[Location]:
    """Remove the checkpoint folders a finished training no longer needs; returns those removed.

    Always: leftovers of interrupted writes (``*.tmp`` folders, checkpoint folders without a readable
    position.json or a complete manifest), which are never resumed. With ``keep`` (``train.keep_checkpoints``): also every
    complete checkpoint but the ``keep`` newest up to ``used`` (the one the student was saved from,
    always kept) and those after ``used``, which failed verification. Ray Train prunes only the
    checkpoints it registered; this catches the rest: those of a killed attempt after its last
    registered report, and all of local mode's (``ray.num_workers=0``), which the loop writes itself.
    Call it only when no attempt is writing (after ``fit()`` has returned). The checkpoints Ray Train's
    run snapshot names are never removed: a later fit() in this folder refuses to start when one of
    them is missing; with an unreadable snapshot nothing is removed.
    """
    complete = list_checkpoints(run_dir)
    if used not in complete:
        raise ValueError(f"{used} is not a complete checkpoint of {experiment_dir(run_dir)}")
    registered = ray_registered_checkpoints(run_dir)
    if registered is None:
        return []
    retained = set(complete)
    if keep is not None:
        end = complete.index(used) + 1
        retained = set(complete[max(0, end - keep):end])
    removed = [p for p in experiment_dir(run_dir).glob("checkpoint_*")
               if p.is_dir() and p not in retained and p.name not in registered]
    for folder in sorted(removed, key=str):
        remove_tree(folder)
    return removed
