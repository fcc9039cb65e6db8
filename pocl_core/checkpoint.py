"""Training checkpoints: one folder holding everything needed to continue exactly.

Folder contents::

    model.safetensors     student weights (state dict of the unwrapped model)
    optimizer.pt          optimizer state (``optimizer.state_dict()``, or the name-keyed full state under
                          FSDP; torch.save, loaded with weights_only=True)
    scheduler.pt          LR scheduler state_dict
    rng.pt                every worker's torch (CPU and its CUDA device) / numpy / python RNG states, by rank
    position.json         curriculum position: stage, step_in_stage, global_step, samples_seen; the run's
                          ``train_key``; under float16 autocast the loss scaler's state (``grad_scaler``)
    replay_buffer.json    (GKD with a replay buffer only) every worker's buffered generations, by rank
    manifest.json         sha256 of every file above; written last, so its presence marks completion

``load_checkpoint`` verifies the manifest and raises CheckpointError on a missing or altered file, or
a manifest that is unreadable or leaves out one of ``REQUIRED_FILES``.
``verify_checkpoint`` and ``read_position`` also read a checkpoint in an object store (an
``s3://`` URI or ``storage.ObjectPath``, e.g. Ray Train storage in a remote run folder); loading
weights needs a local folder (download it first: ``storage.download_dir``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pocl_core.encoding import EncodedSample
from pocl_core.storage import Location, ObjectPath, location, open_input

MANIFEST = "manifest.json"
REPLAY_BUFFERS = "replay_buffer.json"
RNG = "rng.pt"
GRAD_SCALER_KEY = "grad_scaler"  # in position.json: torch.amp.GradScaler.state_dict() (float16 autocast only)
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", RNG, "position.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or fails its checksums."""


@dataclass(frozen=True)
class Position:
    """Where training stands: the next step to run is ``step_in_stage`` of ``stage``."""

    stage: int
    step_in_stage: int
    global_step: int
    samples_seen: int


def _sha256(path: Location) -> str:
    h = hashlib.sha256()
    with open_input(path) as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: torch CPU, the CUDA ``device``'s (when given), numpy (as lists), python."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
             "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore a ``rng_state`` (its CUDA state onto ``device`` when both are present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], scheduler: Any, position: Position,
                    extra: dict[str, Any] | None = None,
                    replay_buffers: list[list[EncodedSample]] | None = None,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write a complete checkpoint into ``folder`` (created); the manifest goes last.

    ``model`` and ``optimizer`` may be given as their (full) state dicts instead, e.g. gathered from
    a sharded model (``pocl_core.parallel.full_state``). ``replay_buffers``: each worker's GKD replay
    buffer, oldest first, indexed by rank (saved only when given). ``rng_states``: each worker's
    ``rng_state()``, indexed by rank (default: this process's alone).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    save_file(_untie(state), str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer,
               folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    ranks = rng_states if rng_states is not None else [rng_state()]
    torch.save({"world_size": len(ranks), "ranks": ranks}, folder / RNG)
    (folder / "position.json").write_text(json.dumps({**asdict(position), **(extra or {})}, indent=2))
    files = list(REQUIRED_FILES)
    if replay_buffers is not None:
        ranks = [[[e.sample_id, e.input_ids, e.n_prompt] for e in buffer] for buffer in replay_buffers]
        (folder / REPLAY_BUFFERS).write_text(json.dumps({"world_size": len(ranks), "ranks": ranks}))
        files.append(REPLAY_BUFFERS)
    manifest = {f: _sha256(folder / f) for f in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): clone tensors that alias another."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _read_manifest(folder: Location) -> dict[str, str]:
    """The manifest's {file: sha256}; CheckpointError when it is missing, unreadable or leaves out a
    required file."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CheckpointError(f"{folder}: {MANIFEST} is not a map of file names to checksums")
    unlisted = [name for name in REQUIRED_FILES if name not in manifest]
    if unlisted:
        raise CheckpointError(f"{folder}: {MANIFEST} does not list {', '.join(unlisted)}")
    return manifest


def check_complete(folder: str | Path | ObjectPath) -> None:
    """Raise CheckpointError unless the manifest is readable, lists every required file, and every
    file it lists is there: what an interrupted write or copy leaves fails this. Reads no file's
    bytes (``verify_checkpoint`` also compares the checksums)."""
    folder = location(folder)
    missing = [name for name in _read_manifest(folder) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}")


def verify_checkpoint(folder: str | Path | ObjectPath, names: Iterable[str] | None = None) -> None:
    """Raise CheckpointError unless the manifest is readable, lists every required file, and every
    checksum matches (local or remote); with ``names``, only the files of ``names`` that the manifest
    lists are checked (a partial copy; the required files are always listed)."""
    folder = location(folder)
    manifest = _read_manifest(folder)
    if names is not None:
        wanted = set(names)
        manifest = {name: digest for name, digest in manifest.items() if name in wanted}
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: missing {name}")
        if _sha256(path) != digest:
            raise CheckpointError(f"{folder}: checksum mismatch for {name}")


def read_optimizer_state(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """The saved optimizer state (checksums verified first unless ``verify`` is False: the caller
    already did), for loaders that place it themselves."""
    if verify:
        verify_checkpoint(folder)
    return torch.load(Path(folder) / "optimizer.pt", weights_only=True)


def read_position(folder: str | Path | ObjectPath) -> Position:
    data = json.loads((location(folder) / "position.json").read_text())
    return Position(**{k: data[k] for k in ("stage", "step_in_stage", "global_step", "samples_seen")})


def read_replay_buffers(folder: str | Path, verify: bool = True) -> list[list[EncodedSample]] | None:
    """Each rank's saved GKD replay buffer (oldest first), or None when the checkpoint has none.

    Checksums are verified first (unless ``verify`` is False). The list's length is the world size
    the run had when it was saved.
    """
    if verify:
        verify_checkpoint(folder)
    path = Path(folder) / REPLAY_BUFFERS
    if not path.is_file():
        return None
    ranks = json.loads(path.read_text())["ranks"]
    return [[EncodedSample(sid, list(ids), int(n_prompt)) for sid, ids, n_prompt in buffer] for buffer in ranks]


def read_rng_states(folder: str | Path, verify: bool = True) -> list[dict[str, Any]]:
    """Every saved worker's RNG states, indexed by rank (a checkpoint from before per-rank states
    holds one, rank 0's). Checksums are verified first unless ``verify`` is False."""
    if verify:
        verify_checkpoint(folder)
    saved = torch.load(Path(folder) / RNG, weights_only=True)
    return saved["ranks"] if "ranks" in saved else [saved]


def load_checkpoint(folder: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = False, verify: bool = True) -> Position:
    """Verify the checksums (unless ``verify`` is False), then load what is given (weights,
    optimizer, scheduler, rank 0's RNG states) in place.

    Returns the saved curriculum position. ``folder`` must be local (weights load from files).
    """
    if isinstance(location(folder), ObjectPath):
        raise ValueError(f"load_checkpoint needs a local folder; download {folder} first (storage.download_dir)")
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    if model is not None:
        try:
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not match the model: {exc}") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if restore_rng:
        set_rng_state(read_rng_states(folder, verify=False)[0])
    return read_position(folder)
