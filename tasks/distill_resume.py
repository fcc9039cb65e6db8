"""Resuming the training loop: the newest valid checkpoint's weights, and what the first resumed
stage restores from it (optimizer, LR schedule, every worker's RNG streams, GKD replay buffers)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.fs as pafs
import ray.train
import torch

from pocl_core.checkpoint import (GRAD_SCALER_KEY, MANIFEST, REPLAY_BUFFERS, RNG, Position, load_checkpoint,
                                  read_optimizer_state, read_replay_buffers, read_rng_states, set_rng_state,
                                  verify_checkpoint)
from pocl_core.config import PoclConfig
from pocl_core.encoding import EncodedSample
from pocl_core.on_policy import OnPolicyMixer
from pocl_core.parallel import all_ranks_succeed, decided_by_rank0
from pocl_core.storage import Location, ObjectPath, download_dir, download_files
from tasks.run_checkpoints import experiment_dir, list_checkpoints, named_as_stored, newest_verified_copy


@dataclass
class Resumed:
    """What a resumed run restores besides the weights, read once from the chosen checkpoint (whose
    local copy is deleted right after). ``optimizer_state``/``scheduler_state``: only when the resumed
    stage continues an optimizer (mid-stage, or one optimizer across stages)."""

    name: str
    position: Position
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    rng_states: list[dict[str, Any]]
    replay_buffers: list[list[EncodedSample]] | None
    grad_scaler_state: dict[str, Any] | None = None  # float16 autocast's loss scale, growth tracker


# what a rank that receives its weights from rank 0 (FSDP) reads of a checkpoint: manifest first
RANK_FILES = (MANIFEST, "position.json", "scheduler.pt", RNG, REPLAY_BUFFERS)


def _pick_checkpoint(loop_config: dict[str, Any], temp_dirs: list[str]) -> tuple[str, Location, Path] | None:
    """The checkpoint to resume from, verified: (kind, the folder, a local folder holding its files)
    with kind "storage" for a folder of the run's storage (downloaded into a temporary folder when it
    lives in an object store) or "latest" for Ray Train's latest checkpoint when it lives outside that
    storage (copied locally); None when there is none. RuntimeError when every candidate fails its
    checksums or the chosen one was written under another training key."""
    candidates: list[Location] = list(reversed(list_checkpoints(loop_config["run_dir"])))
    in_storage = {p.name for p in experiment_dir(loop_config["run_dir"]).glob("checkpoint_*")}
    latest = ray.train.get_checkpoint()
    latest_copy = None
    if latest is not None and Path(latest.path).name not in in_storage:
        latest_copy = _copy_latest(latest, temp_dirs)
        candidates.insert(0, latest_copy)
    if not candidates:
        return None
    found = newest_verified_copy(candidates, lambda: _temp_dir(temp_dirs))
    if found is None:
        raise RuntimeError(
            f"no checkpoint of {experiment_dir(loop_config['run_dir'])} passes its checksums (each one is "
            "named in a warning above): the saved files were altered or damaged after they were written; "
            "remove those folders to start training again, or use a new run_name")
    chosen, local = found
    kind = "latest" if latest is not None and chosen == latest_copy else "storage"
    if kind == "latest":
        chosen = Path(latest.path)  # named in messages: the copy is temporary
    key = json.loads((local / "position.json").read_text()).get("train_key")
    if key != loop_config["train_key"]:
        raise RuntimeError(
            f"checkpoint {chosen} was written by a different training config (train_key {key}, now "
            f"{loop_config['train_key']}); use a new run_name to train with the new settings")
    return kind, chosen, local


def _temp_dir(temp_dirs: list[str]) -> Path:
    """A new temporary folder, added to ``temp_dirs`` (removed once the checkpoint is read)."""
    temp_dirs.append(tempfile.mkdtemp(prefix="pocl-resume-"))
    return Path(temp_dirs[-1])


def _copy_latest(latest: ray.train.Checkpoint, temp_dirs: list[str], names: Iterable[str] | None = None) -> Path:
    """A local copy of Ray Train's checkpoint ``latest`` (only its files of ``names``, when given and
    there) in a new temporary folder (added to ``temp_dirs``)."""
    copy = _temp_dir(temp_dirs)
    if names is None:
        with latest.as_directory() as d:
            shutil.copytree(d, copy, dirs_exist_ok=True)
        return copy
    for name in names:
        src = f"{latest.path.rstrip('/')}/{name}"
        if latest.filesystem.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, str(copy / name), source_filesystem=latest.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
    return copy


def resume_checkpoint(loop_config: dict[str, Any], student_lm: torch.nn.Module | None, cfg: PoclConfig) -> Resumed | None:
    """Load the newest valid checkpoint's weights into ``student_lm``; None when there is none.

    ``student_lm`` None: an FSDP rank other than 0, which receives weights and optimizer state from
    rank 0 after sharding; it reads neither (its ``optimizer_state`` is an empty dict to receive into),
    and from an object store it downloads only the small files (``RANK_FILES``).

    Rank 0 alone picks the checkpoint and every rank resumes the same one (a collective when the
    training has several workers; an error of any rank's, in the pick or in reading the checkpoint,
    stops every rank). Candidates, newest first:
    every complete checkpoint folder in the run's storage (Ray Train registers a reported checkpoint
    only at its next poll, so a run killed right after a report can leave a complete, verified
    checkpoint that Ray does not know; using it avoids redoing finished work; folders an interrupted
    write left incomplete are not candidates), preceded by Ray Train's latest checkpoint only if it
    lives outside that storage (copied locally). Rank 0 checks each one's checksums and takes the
    first that passes; one in an object store is downloaded into a local temporary folder first and
    verified there, so rank 0 reads each remote file once, and the copy is deleted once read. The other
    ranks verify what they download or copy themselves (their copies were not what rank 0 read).
    """
    temp_dirs: list[str] = []
    picked: list[tuple[Location, Path]] = []  # rank 0's pick and its local, verified copy

    def pick() -> tuple[str, str] | None:
        choice = _pick_checkpoint(loop_config, temp_dirs)
        if choice is None:
            return None
        kind, chosen, local = choice
        picked.append((chosen, local))
        return kind, chosen.name

    def read(choice: tuple[str, str]) -> Resumed:
        names = None if student_lm is not None else RANK_FILES
        if picked:
            chosen, folder = picked[0]
        elif choice[0] == "latest":
            latest = ray.train.get_checkpoint()
            if latest is None or Path(latest.path).name != choice[1]:
                raise RuntimeError(f"rank 0 resumes Ray Train's latest checkpoint {choice[1]}, which this "
                                   f"rank does not see (it sees {latest and Path(latest.path).name})")
            chosen = Path(latest.path)
            folder = _copy_latest(latest, temp_dirs, names)
            verify_checkpoint(folder, names=names)  # rank 0 verified its own copy
        else:
            chosen = experiment_dir(loop_config["run_dir"]) / choice[1]  # rank 0 verified it
            if isinstance(chosen, ObjectPath):
                local = _temp_dir(temp_dirs)
                folder = download_dir(chosen, local) if names is None else download_files(chosen, local, names)
                verify_checkpoint(folder, names=names)  # what arrived here, which rank 0 did not read
            else:
                folder = Path(chosen)
        with named_as_stored(folder, chosen):
            position = load_checkpoint(folder, model=student_lm, verify=False)
            recorded = json.loads((folder / "position.json").read_text())
            continues_optimizer = position.step_in_stage > 0 or not cfg.curriculum.fresh_optimizer_per_stage
            return Resumed(
                name=str(chosen), position=position,
                optimizer_state=(read_optimizer_state(folder, verify=False) if student_lm is not None else {})
                if continues_optimizer else None,
                scheduler_state=torch.load(folder / "scheduler.pt", weights_only=True) if continues_optimizer else None,
                rng_states=read_rng_states(folder, verify=False),
                replay_buffers=read_replay_buffers(folder, verify=False),
                grad_scaler_state=recorded.get(GRAD_SCALER_KEY))

    try:
        choice = decided_by_rank0(pick)
        if choice is None:
            return None
        return all_ranks_succeed(lambda: read(choice))
    finally:
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def restore_replay_buffer(mixer: OnPolicyMixer, resumed: Resumed, rank: int, world: int) -> None:
    """Refill this rank's replay buffer from the checkpoint, so the resumed steps draw what an
    uninterrupted run would. A checkpoint without buffers, or saved by another number of workers,
    leaves it empty (with a warning): the run continues, no longer step-for-step identical."""
    saved = resumed.replay_buffers
    if saved is None or len(saved) != world:
        why = "has no replay buffers" if saved is None else f"holds the buffers of {len(saved)} workers, not {world}"
        logging.getLogger("pocl").warning("checkpoint %s %s: the GKD replay buffer starts empty", resumed.name, why)
        return
    mixer.buffer.add(saved[rank])


def restore_rng(resumed: Resumed, rank: int, world: int, device: torch.device) -> None:
    """Continue this rank's RNG streams (dropout, shuffles) where the checkpoint left them. Saved by
    another number of workers (or before states were kept per worker): rank 0's, with a warning."""
    states = resumed.rng_states
    if len(states) == world:
        set_rng_state(states[rank], device)
        return
    if rank == 0:
        logging.getLogger("pocl").warning(
            "checkpoint %s holds the RNG states of %d worker(s), not %d: every worker continues rank 0's "
            "(random ops such as dropout then differ from an uninterrupted run)", resumed.name, len(states), world)
    set_rng_state(states[0], device)
