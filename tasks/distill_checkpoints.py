"""What the training loop writes at stage boundaries and every N steps: checkpoints reported to Ray
Train (rank 0 attaches the folder; every rank reports) and the per-stage students.

Both gather the student's full weights first (a collective under FSDP), so every rank calls them."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch

from pocl_core.checkpoint import GRAD_SCALER_KEY, MANIFEST, Position, save_checkpoint
from pocl_core.contracts import STUDENT_PROVENANCE, RunPaths
from pocl_core.encoding import EncodedSample
from pocl_core.models import weights_digest
from pocl_core.parallel import full_state, unwrap
from pocl_core.storage import ObjectPath, location, write_dir_atomic


def student_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  rank: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """The Hugging Face student's full weights (``lm.`` prefix dropped) and optimizer state on rank 0.

    Every rank must call it (a collective under FSDP); other ranks get (None, None).
    """
    weights, optim = full_state(student, optimizer, rank)
    if weights is None:
        return None, None
    return {k.removeprefix("lm."): v for k, v in weights.items()}, optim


def report_checkpoint(student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, position: Position,
                      rank: int, train_key: str, metrics: dict[str, Any],
                      in_place: str | ObjectPath | None = None,
                      replay_buffers: list[list[EncodedSample]] | None = None,
                      rng_states: list[dict[str, Any]] | None = None,
                      grad_scaler: dict[str, Any] | None = None) -> None:
    """Every rank gathers the state and reports (collectives); rank 0 attaches the checkpoint folder.

    Ray Train copies a reported folder into its storage, so it is written to a temporary folder; in
    local mode (``in_place``: the experiment folder) nothing is copied and it is written there instead.
    ``replay_buffers`` / ``rng_states``: every rank's GKD replay buffer and RNG states (already
    gathered), saved with the checkpoint; ``grad_scaler``: the float16 loss scaler's state (in
    position.json). Local in-place folders are built beside and renamed in.
    """
    weights, optim = student_state(student, optimizer, rank)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return

    def save(folder: str | Path) -> Path:
        extra = {"train_key": train_key, **({GRAD_SCALER_KEY: grad_scaler} if grad_scaler is not None else {})}
        return save_checkpoint(folder, weights, optim, scheduler, position, extra=extra,
                               replay_buffers=replay_buffers, rng_states=rng_states)

    if in_place is not None:
        folder = location(in_place) / f"checkpoint_local_{position.global_step:06d}_{position.stage:02d}"
        write_dir_atomic(folder, save, last=MANIFEST)  # remote: uploaded with the manifest last
        checkpoint = ray.train.Checkpoint(path=folder.key, filesystem=folder.fs) if isinstance(folder, ObjectPath) \
            else ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint)
        return
    folder = tempfile.mkdtemp(prefix="pocl-ckpt-")
    try:
        save(folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_stage_student(student: torch.nn.Module, run_dir: str | ObjectPath, stage: int, train_key: str,
                       rank: int) -> None:
    """Save the student as it ends ``stage`` to ``<run>/stages/stage_<s>`` (save_pretrained, atomic; rank 0).

    Every rank calls it (gathering sharded weights is a collective). Written before the
    stage-boundary checkpoint is reported, so a resumed run past that checkpoint always finds it.
    """
    weights, _ = student_state(student, None, rank)
    if weights is None:
        return
    inner = unwrap(student).lm

    def build(folder: Path) -> None:
        inner.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        provenance = {"train_key": train_key, "stage": stage, "weights": weights_digest(folder)}
        (folder / STUDENT_PROVENANCE).write_text(json.dumps(provenance))

    write_dir_atomic(RunPaths.of(run_dir).stage_student(stage), build, last=STUDENT_PROVENANCE)
