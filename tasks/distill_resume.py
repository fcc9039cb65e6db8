"""Resuming the training loop: the newest valid checkpoint's weights, and what the first resumed
stage restores from it (optimizer, LR schedule, every worker's RNG streams, GKD replay buffers)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from tasks.run_checkpoints import experiment_dir, list_checkpoints, newest_valid_checkpoint


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


def _pick_checkpoint(loop_config: dict[str, Any], temp_dirs: list[str]) -> tuple[str, str, Location] | None:
    """The checkpoint to resume from, verified: ("storage", name, folder) for a folder of the run's
    storage, ("latest", name, local copy) for Ray Train's latest checkpoint when it lives outside that
    storage; None when there is none. RuntimeError when every candidate fails its checksums or the
    chosen one was written under another training key."""
    candidates: list[Location] = list(reversed(list_checkpoints(loop_config["run_dir"])))
    in_storage = {p.name for p in experiment_dir(loop_config["run_dir"]).glob("checkpoint_*")}
    latest = ray.train.get_checkpoint()
    latest_copy = None
    if latest is not None and Path(latest.path).name not in in_storage:
        latest_copy = _copy_latest(latest, temp_dirs)
        candidates.insert(0, latest_copy)
    if not candidates:
        return None
    chosen = newest_valid_checkpoint(candidates)
    if chosen is None:
        raise RuntimeError(
            f"no checkpoint of {experiment_dir(loop_config['run_dir'])} passes its checksums (each one is "
            "named in a warning above): the saved files were altered or damaged after they were written; "
            "remove those folders to start training again, or use a new run_name")
    found = json.loads((chosen / "position.json").read_text()).get("train_key")
    if found != loop_config["train_key"]:
        raise RuntimeError(
            f"checkpoint {chosen} was written by a different training config (train_key {found}, now "
            f"{loop_config['train_key']}); use a new run_name to train with the new settings")
    if latest is not None and chosen == latest_copy:
        return "latest", Path(latest.path).name, chosen
    return "storage", chosen.name, chosen


def _copy_latest(latest: ray.train.Checkpoint, temp_dirs: list[str]) -> Path:
    """A local copy of Ray Train's checkpoint ``latest`` in a new temporary folder (added to ``temp_dirs``)."""
    copy = tempfile.mkdtemp(prefix="pocl-resume-")
    temp_dirs.append(copy)
    with latest.as_directory() as d:
        shutil.copytree(d, copy, dirs_exist_ok=True)
    return Path(copy)


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
    lives outside that storage (copied locally). Rank 0 checks each one's checksums, read through the
    run folder's filesystem, and takes the first that passes. A remote one is then downloaded to a
    local temporary folder (its files verified again there) and deleted once read; a copy of Ray's
    latest made by another rank is verified too.
    """
    temp_dirs: list[str] = []
    picked: list[Location] = []  # rank 0's own pick, already verified (its copy of Ray's latest included)

    def pick() -> tuple[str, str] | None:
        choice = _pick_checkpoint(loop_config, temp_dirs)
        if choice is None:
            return None
        picked.append(choice[2])
        return choice[0], choice[1]

    def read(choice: tuple[str, str]) -> Resumed:
        if picked:
            chosen, verified = picked[0], True
        elif choice[0] == "latest":
            latest = ray.train.get_checkpoint()
            if latest is None or Path(latest.path).name != choice[1]:
                raise RuntimeError(f"rank 0 resumes Ray Train's latest checkpoint {choice[1]}, which this "
                                   f"rank does not see (it sees {latest and Path(latest.path).name})")
            chosen, verified = _copy_latest(latest, temp_dirs), False
        else:
            chosen, verified = experiment_dir(loop_config["run_dir"]) / choice[1], True  # rank 0 verified it
        names = None if student_lm is not None else RANK_FILES
        if isinstance(chosen, ObjectPath):
            temp_dirs.append(tempfile.mkdtemp(prefix="pocl-resume-"))
            local = Path(temp_dirs[-1])
            folder = download_dir(chosen, local) if names is None else download_files(chosen, local, names)
            verified = False
        else:
            folder = Path(chosen)
        if not verified:
            verify_checkpoint(folder, names=names)
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
