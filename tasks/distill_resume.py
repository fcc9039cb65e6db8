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

from pocl_core.checkpoint import (GRAD_SCALER_KEY, Position, load_checkpoint, read_optimizer_state,
                                  read_replay_buffers, read_rng_states, set_rng_state)
from pocl_core.config import PoclConfig
from pocl_core.data import EncodedSample
from pocl_core.on_policy import OnPolicyMixer
from pocl_core.storage import Location, ObjectPath, download_dir
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


def resume_checkpoint(loop_config: dict[str, Any], student_lm: torch.nn.Module | None, cfg: PoclConfig) -> Resumed | None:
    """Load the newest valid checkpoint's weights into ``student_lm``; None when there is none.

    ``student_lm`` None: an FSDP rank other than 0, which receives weights and optimizer state from
    rank 0 after sharding; it reads neither (its ``optimizer_state`` is an empty dict to receive into).

    Candidates, newest first: every complete checkpoint folder in the run's storage (Ray Train
    registers a reported checkpoint only at its next poll, so a run killed right after a report can
    leave a complete, verified checkpoint that Ray does not know; using it avoids redoing finished
    work; folders an interrupted write left incomplete are not candidates), preceded by Ray Train's
    latest checkpoint only if it lives outside that storage (copied locally). Each must pass its
    checksums, read through the run folder's filesystem; a remote one is then downloaded to a local
    temporary folder (verified again there) and deleted once read.
    """
    candidates: list[Location] = list(reversed(list_checkpoints(loop_config["run_dir"])))
    latest = ray.train.get_checkpoint()
    local_copy = None
    try:
        in_storage = {p.name for p in experiment_dir(loop_config["run_dir"]).glob("checkpoint_*")}
        if latest is not None and Path(latest.path).name not in in_storage:
            local_copy = tempfile.mkdtemp(prefix="pocl-resume-")
            with latest.as_directory() as d:
                shutil.copytree(d, local_copy, dirs_exist_ok=True)
            candidates.insert(0, Path(local_copy))
        if not candidates:
            return None
        chosen = newest_valid_checkpoint(candidates)
        if chosen is None:
            raise RuntimeError(
                f"no checkpoint of {experiment_dir(loop_config['run_dir'])} passes its checksums (each one is "
                "named in a warning above): the saved files were altered or damaged after they were written; "
                "remove those folders to start training again, or use a new run_name")
        recorded = json.loads((chosen / "position.json").read_text())
        found = recorded.get("train_key")
        if found != loop_config["train_key"]:
            raise RuntimeError(
                f"checkpoint {chosen} was written by a different training config (train_key {found}, now "
                f"{loop_config['train_key']}); use a new run_name to train with the new settings")
        remote = isinstance(chosen, ObjectPath)
        if remote:
            if local_copy is not None:
                shutil.rmtree(local_copy, ignore_errors=True)
            local_copy = tempfile.mkdtemp(prefix="pocl-resume-")
            folder = download_dir(chosen, Path(local_copy))
        else:
            folder = Path(chosen)
        position = load_checkpoint(folder, model=student_lm, verify=remote)  # local ones were just verified
        continues_optimizer = position.step_in_stage > 0 or not cfg.curriculum.fresh_optimizer_per_stage
        return Resumed(
            name=str(chosen), position=position,
            optimizer_state=(read_optimizer_state(folder, verify=False) if student_lm is not None else {})
            if continues_optimizer else None,
            scheduler_state=torch.load(folder / "scheduler.pt", weights_only=True) if continues_optimizer else None,
            rng_states=read_rng_states(folder, verify=False),
            replay_buffers=read_replay_buffers(folder, verify=False),
            grad_scaler_state=recorded.get(GRAD_SCALER_KEY))
    finally:
        if local_copy is not None:
            shutil.rmtree(local_copy, ignore_errors=True)


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
