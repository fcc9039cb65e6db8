import hashlib
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pocl_core.checkpoint import (MANIFEST, REQUIRED_FILES, CheckpointError, Position, load_checkpoint, read_replay_buffers,
                                  read_rng_states, rng_state, save_checkpoint, set_rng_state, verify_checkpoint)
from pocl_core.encoding import EncodedSample
from pocl_core.config import StorageConfig
from pocl_core.storage import location, upload_dir
from tasks.run_checkpoints import (experiment_dir, foreign_checkpoints, list_checkpoints, newest_verified_copy,
                                   prune_checkpoints)


def _state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_roundtrip_restores_weights_optimizer_scheduler_rng_and_position(tmp_path):
    model, opt, sched = _state(0)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    save_checkpoint(tmp_path, model, opt, sched, Position(2, 3, 17, 136), extra={"train_key": "k"})
    expect = (torch.rand(1), np.random.rand(), random.random())

    model2, opt2, sched2 = _state(1)
    for _ in range(3):  # the target's scheduler is elsewhere: only a restore brings it back
        opt2.step()
        sched2.step()
    assert sched2.last_epoch == 4 != sched.last_epoch == 1
    pos = load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, restore_rng=True)
    assert pos == Position(2, 3, 17, 136)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 1
    assert sched2.get_last_lr() == pytest.approx([0.05])  # StepLR(gamma 0.5) one step after lr 0.1
    assert (torch.rand(1), np.random.rand(), random.random()) == expect


def test_tampered_or_incomplete_checkpoint_is_refused(tmp_path):
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    verify_checkpoint(tmp_path)
    with open(tmp_path / "optimizer.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="checksum mismatch for optimizer.pt"):
        load_checkpoint(tmp_path, model=model)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(tmp_path)


def test_a_partial_copy_is_verified_file_by_file(tmp_path):
    """``names``: only those files are checked (a rank that downloaded the small files alone)."""
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    (tmp_path / "model.safetensors").unlink()
    with open(tmp_path / "optimizer.pt", "ab") as fh:
        fh.write(b"x")
    verify_checkpoint(tmp_path, names=["position.json", "rng.pt", "scheduler.pt", "replay_buffer.json"])
    with pytest.raises(CheckpointError, match="checksum mismatch for optimizer.pt"):
        verify_checkpoint(tmp_path, names=iter(["rng.pt", "optimizer.pt"]))  # any iterable of names
    (tmp_path / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="missing rng.pt"):
        verify_checkpoint(tmp_path, names=["position.json", "rng.pt"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(tmp_path, model=torch.nn.Linear(4, 3))


def test_replay_buffers_roundtrip_by_rank_and_are_checksummed(tmp_path):
    model, opt, sched = _state(0)
    buffers = [[EncodedSample("a", [5, 6, 7, 2], 2), EncodedSample("b", [5, 9], 1)], []]  # rank 1's is empty
    save_checkpoint(tmp_path / "with", model, opt, sched, Position(0, 1, 1, 4), replay_buffers=buffers)
    assert read_replay_buffers(tmp_path / "with") == buffers
    save_checkpoint(tmp_path / "without", model, opt, sched, Position(0, 1, 1, 4))
    assert read_replay_buffers(tmp_path / "without") is None
    assert not (tmp_path / "without" / "replay_buffer.json").exists()
    with open(tmp_path / "with" / "replay_buffer.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(CheckpointError, match="checksum mismatch for replay_buffer.json"):
        read_replay_buffers(tmp_path / "with")


def test_rng_states_are_kept_per_rank_and_old_single_state_files_still_load(tmp_path):
    model, opt, sched = _state(0)
    states = []
    for seed in (11, 22):  # two workers whose streams have diverged
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        states.append(rng_state())
    save_checkpoint(tmp_path / "new", model, opt, sched, Position(1, 0, 4, 32), rng_states=states)
    saved = read_rng_states(tmp_path / "new")
    assert len(saved) == 2
    for seed, state in zip((11, 22), saved):
        set_rng_state(state)
        got = (torch.rand(1).item(), np.random.rand(), random.random())
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        assert got == (torch.rand(1).item(), np.random.rand(), random.random())
    # a checkpoint written before per-rank states: rng.pt held one state; it reads as rank 0's
    old = tmp_path / "old"
    save_checkpoint(old, model, opt, sched, Position(1, 0, 4, 32))
    torch.save(states[1], old / "rng.pt")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["rng.pt"] = hashlib.sha256((old / "rng.pt").read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert len(read_rng_states(old)) == 1
    load_checkpoint(old, restore_rng=True)
    first = torch.rand(1).item()
    set_rng_state(states[1])
    assert first == torch.rand(1).item()


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "manifest.json").write_text('{"model.safetensors": "ab'), "unreadable manifest.json"),
    (lambda d: (d / "manifest.json").write_text(""), "unreadable manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{}"), "does not list model.safetensors"),
    (lambda d: (d / "manifest.json").write_text('["model.safetensors"]'), "not a map"),
])
def test_a_damaged_manifest_is_a_checkpoint_error(tmp_path, damage, match):
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(tmp_path)


def test_resume_candidates_skip_damaged_and_half_built_folders(tmp_path, caplog):
    model, opt, sched = _state(0)
    root = tmp_path / "train" / "distill"
    for step in (4, 8, 12):
        save_checkpoint(root / f"checkpoint_{step:03d}", model, opt, sched, Position(0, step, step, 8 * step),
                        extra={"train_key": "k" if step < 12 else "other"})
    (root / "checkpoint_008" / "model.safetensors").write_bytes(b"damaged")  # fails its checksum
    save_checkpoint(root / "checkpoint_016.tmp", model, opt, sched, Position(1, 0, 16, 128))  # being built
    (root / "checkpoint_020").mkdir()
    (root / "checkpoint_020" / "position.json").write_text("")  # torn position
    for step, damage in ((24, "torn manifest"), (28, "no manifest"), (32, "a listed file missing")):
        folder = root / f"checkpoint_{step:03d}"  # what an interrupted write or copy leaves
        save_checkpoint(folder, model, opt, sched, Position(2, 0, step, 8 * step), extra={"train_key": "k"})
        if damage == "torn manifest":
            (folder / "manifest.json").write_text('{"model.safe')
        elif damage == "no manifest":
            (folder / "manifest.json").unlink()
        else:
            (folder / "optimizer.pt").unlink()
    with caplog.at_level(logging.INFO, logger="pocl"):
        found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint_004", "checkpoint_008", "checkpoint_012"]
    assert "checkpoint_020" in caplog.text
    assert "checkpoint_024, an interrupted write: " in caplog.text and "unreadable manifest.json" in caplog.text
    assert "checkpoint_028: no manifest.json" in caplog.text and "checkpoint_032: missing optimizer.pt" in caplog.text
    # newest first: 012 is valid (another key, see below), 008 is skipped, 004 is the fallback
    assert newest_verified_copy([found[1], found[0]], lambda: tmp_path)[0].name == "checkpoint_004"
    assert "checkpoint_008: checksum mismatch for model.safetensors" in caplog.text
    assert [p.name for p in foreign_checkpoints(tmp_path, "k")] == ["checkpoint_012"]


def _plant_checkpoint_folders(run_dir) -> None:
    """Complete checkpoints at global steps 10..50 (every required file and a manifest; dummy bytes),
    a half-built ``.tmp`` folder, interrupted uploads (070 without a position, 045 without a manifest,
    035 without a file its manifest lists) and Ray Train's own snapshot file."""
    root = experiment_dir(run_dir)
    left_out = {"checkpoint_070": "position.json", "checkpoint_035": "optimizer.pt", "checkpoint_045": "manifest.json"}
    for name in ("checkpoint_010", "checkpoint_020", "checkpoint_030", "checkpoint_035", "checkpoint_040",
                 "checkpoint_045", "checkpoint_050", "checkpoint_060.tmp", "checkpoint_070"):
        (root / name).mkdir(parents=True, exist_ok=True)
        files = {f: b"w" for f in REQUIRED_FILES}
        files["position.json"] = json.dumps({"global_step": int(name[11:14])}).encode()
        files["manifest.json"] = json.dumps({f: "0" * 64 for f in REQUIRED_FILES}).encode()
        for file, data in files.items():
            if left_out.get(name) != file:
                (root / name / file).write_bytes(data)
    (root / "checkpoint_manager_snapshot.json").write_text("{}")


def _names(run_dir) -> list[str]:
    return sorted(p.name for p in experiment_dir(run_dir).iterdir())


@pytest.mark.parametrize("keep, used, left", [
    # keep_checkpoints unset: every complete checkpoint stays, the leftovers of interrupted writes go
    (None, 50, [10, 20, 30, 40, 50]),
    # the keep newest up to the one the student came from (035 and 045, incomplete, do not count);
    # 50 (after it) failed verification
    (2, 40, [30, 40]),
    (2, 50, [40, 50]),
    (1, 50, [50]),
    (9, 30, [10, 20, 30]),
])
def test_pruning_keeps_the_newest_complete_checkpoints_up_to_the_one_used(tmp_path, keep, used, left):
    _plant_checkpoint_folders(tmp_path)
    used_dir = tmp_path / "train" / "distill" / f"checkpoint_{used:03d}"
    removed = prune_checkpoints(tmp_path, used_dir, keep)
    kept = [f"checkpoint_{s:03d}" for s in left]
    assert _names(tmp_path) == sorted(kept + ["checkpoint_manager_snapshot.json"])
    assert sorted(p.name for p in removed) == sorted(
        {f"checkpoint_{s:03d}" for s in (10, 20, 30, 35, 40, 45, 50, 70)} - set(kept) | {"checkpoint_060.tmp"})


def test_pruning_refuses_a_used_checkpoint_that_is_not_complete(tmp_path):
    _plant_checkpoint_folders(tmp_path)
    with pytest.raises(ValueError, match="checkpoint_070 is not a complete checkpoint"):
        prune_checkpoints(tmp_path, tmp_path / "train" / "distill" / "checkpoint_070", 1)
    assert "checkpoint_010" in _names(tmp_path)  # nothing removed


def test_pruning_never_removes_a_checkpoint_ray_trains_snapshot_names(tmp_path, caplog):
    """A later fit() in the folder refuses to start when a checkpoint of the snapshot is missing."""
    _plant_checkpoint_folders(tmp_path)
    snapshot = experiment_dir(tmp_path) / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_020", "metrics": {}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_050", "metrics": {}}}))
    used = experiment_dir(tmp_path) / "checkpoint_040"
    removed = prune_checkpoints(tmp_path, used, 1)
    assert _names(tmp_path) == ["checkpoint_020", "checkpoint_040", "checkpoint_050", snapshot.name]
    assert sorted(p.name for p in removed) == ["checkpoint_010", "checkpoint_030", "checkpoint_035", "checkpoint_045",
                                               "checkpoint_060.tmp", "checkpoint_070"]
    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir')  # torn: nothing can be ruled out
    assert prune_checkpoints(tmp_path, used, 1) == []
    assert "no checkpoint is pruned" in caplog.text
    assert _names(tmp_path) == ["checkpoint_020", "checkpoint_040", "checkpoint_050", snapshot.name]


@pytest.mark.slow
def test_pruning_works_in_an_object_store(s3_server, s3_bucket):
    run_dir = location(f"s3://{s3_bucket}/runs/r0", StorageConfig(endpoint_url=s3_server))
    _plant_checkpoint_folders(run_dir)
    removed = prune_checkpoints(run_dir, experiment_dir(run_dir) / "checkpoint_040", 2)
    assert _names(run_dir) == ["checkpoint_030", "checkpoint_040", "checkpoint_manager_snapshot.json"]
    assert sorted(p.name for p in removed) == ["checkpoint_010", "checkpoint_020", "checkpoint_035", "checkpoint_045",
                                               "checkpoint_050", "checkpoint_060.tmp", "checkpoint_070"]


@pytest.mark.parametrize("remote", [False, True])
def test_the_verified_copy_is_the_folder_itself_or_one_download_of_it(tmp_path, request, caplog, remote):
    """Local candidates are verified in place; remote ones are downloaded once and verified in the copy,
    and the copy of a damaged one is removed with a warning that names the stored folder."""
    run_dir = tmp_path / "run"
    if remote:
        s3_server, s3_bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        run_dir = location(f"s3://{s3_bucket}/runs/r0", StorageConfig(endpoint_url=s3_server))
    model, opt, sched = _state(0)
    for step in (4, 8):
        local = save_checkpoint(tmp_path / f"c{step}", model, opt, sched, Position(0, step, step, 8 * step))
        target = experiment_dir(run_dir) / f"checkpoint_{step:03d}"
        if remote:
            upload_dir(local, target, last=MANIFEST)
        else:
            shutil.copytree(local, target)
    (experiment_dir(run_dir) / "checkpoint_008" / "model.safetensors").write_bytes(b"damaged")
    scratch: list[Path] = []

    def new_folder() -> Path:
        scratch.append(Path(tempfile.mkdtemp(dir=tmp_path)))
        return scratch[-1]

    found = newest_verified_copy(list(reversed(list_checkpoints(run_dir))), new_folder)
    stored, copy = found
    assert stored == experiment_dir(run_dir) / "checkpoint_004"
    assert f"skipping checkpoint {experiment_dir(run_dir) / 'checkpoint_008'}: " \
           f"{experiment_dir(run_dir) / 'checkpoint_008'}: checksum mismatch for model.safetensors" in caplog.text
    if remote:
        assert len(scratch) == 2 and not scratch[0].exists() and copy == scratch[1]  # the damaged copy is gone
        assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (tmp_path / "c4").iterdir())
    else:
        assert scratch == [] and copy == stored
    fresh, _, _ = _state(1)
    assert load_checkpoint(copy, model=fresh) == Position(0, 4, 4, 32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_errors_reading_a_local_copy_name_the_stored_checkpoint(tmp_path, s3_server, s3_bucket):
    """A mismatch found in the temporary copy of a remote checkpoint names the stored folder, which
    outlives the copy; errors about other paths, and local checkpoints read in place, are unchanged."""
    from tasks.run_checkpoints import named_as_stored

    model, opt, sched = _state(0)
    local = save_checkpoint(tmp_path / "c4", model, opt, sched, Position(0, 4, 4, 32))
    stored = experiment_dir(location(f"s3://{s3_bucket}/runs/r0", StorageConfig(endpoint_url=s3_server))) / "ck4"
    upload_dir(local, stored, last=MANIFEST)
    with pytest.raises(CheckpointError) as err, named_as_stored(local, stored):
        load_checkpoint(local, model=torch.nn.Linear(4, 3))
    assert str(err.value).startswith(f"{stored} (read from a local copy): weights do not match")
    assert str(local) not in str(err.value) and isinstance(err.value.__cause__, CheckpointError)
    with pytest.raises(FileNotFoundError) as missing, named_as_stored(local, stored):
        (local / "nothing.json").read_text()
    assert str(stored) in str(missing.value) and str(local) not in str(missing.value)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: weights do not match"), named_as_stored(tmp_path, tmp_path):
        save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
        load_checkpoint(tmp_path, model=torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="^unrelated$"), named_as_stored(local, stored):
        raise ValueError("unrelated")
    with pytest.raises(UnicodeDecodeError) as odd, named_as_stored(local, stored):  # its own arguments: kept
        raise UnicodeDecodeError("utf-8", str(local).encode(), 0, 1, f"in {local}")
    assert odd.value.__notes__ == [f"(the checkpoint is {stored}; {local} was its local copy)"]
    with pytest.raises(FileNotFoundError) as gone, named_as_stored(local, stored):
        open(local / "absent.pt", "rb")
    assert gone.value.errno == 2 and gone.value.filename == str(stored / "absent.pt")
