"""Resuming with several workers: rank 0 alone picks (and verifies) the checkpoint, every rank resumes
the one it picked, an error of any rank (in the pick or in reading the checkpoint) stops every rank,
rank 0 reads each file of a remote checkpoint once (downloaded, then verified and loaded locally), and
a rank that receives its weights from rank 0 (FSDP) downloads only the small files of a remote
checkpoint. Two CPU processes (gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from devtools.processes import free_port
from pocl_core.checkpoint import MANIFEST, Position, rng_state, save_checkpoint
from pocl_core.config_sections import StorageConfig
from pocl_core.storage import location, upload_dir
from tasks.run_checkpoints import experiment_dir

TRAIN_KEY = "key-1"


def _write_checkpoints(run_dir, tmp: Path) -> torch.nn.Module:
    """Three checkpoints at steps 2, 4, 6; the newest has altered weights (fails its checksums).
    Returns the model saved at step 4."""
    torch.manual_seed(0)
    for i, step in enumerate((2, 4, 6)):
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        states = [{**rng_state(), "python": (3, tuple(range(624)) + (100 + r * 10 + i,), None)} for r in (0, 1)]
        local = save_checkpoint(tmp / f"c{i}", model, optimizer, scheduler, Position(0, step, step, 8 * step),
                                extra={"train_key": TRAIN_KEY}, rng_states=states)
        if step == 6:
            (local / "model.safetensors").write_bytes(b"damaged")
        if step == 4:
            kept = model
        target = experiment_dir(run_dir) / f"checkpoint_{i:06d}"
        if isinstance(target, Path):
            shutil.copytree(local, target)
        else:
            upload_dir(local, target, last=MANIFEST)
    return kept


def _worker(rank: int, port: int, run_dir, train_key: str, out: str, out_features: int) -> None:
    import ray.train

    import tasks.distill_resume as resume
    import tasks.run_checkpoints as run_checkpoints

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ray.train.get_checkpoint = lambda: None  # no Ray Train session here: only the run's storage
    # every download: [function, the stored folder's name, the files that arrived]; every verification:
    # whether it read the store (True) or a local folder
    record: dict = {"downloaded": [], "verified_remote": []}
    if rank == 1:
        def refuse(*_):
            raise AssertionError("rank 1 picked a checkpoint itself")
        resume._pick_checkpoint = refuse
    for module in (resume, run_checkpoints):
        for name in ("download_dir", "download_files"):
            if not hasattr(module, name):
                continue

            def spy(src, dest, *rest, _real=getattr(module, name), _name=name):
                folder = _real(src, dest, *rest)
                record["downloaded"].append([_name, src.name, sorted(p.name for p in Path(folder).iterdir())])
                return folder
            setattr(module, name, spy)

        def verify_spy(folder, *rest, _real=module.verify_checkpoint, **kw):
            record["verified_remote"].append(not isinstance(folder, (str, Path)))
            return _real(folder, *rest, **kw)
        module.verify_checkpoint = verify_spy
    try:
        student = torch.nn.Linear(3, out_features) if rank == 0 else None  # rank 1 as under FSDP
        cfg = SimpleNamespace(curriculum=SimpleNamespace(fresh_optimizer_per_stage=True))
        got = resume.resume_checkpoint({"run_dir": run_dir, "train_key": train_key}, student, cfg)
        record.update(name=Path(str(got.name)).name, position=list(got.position.__dict__.values()),
                      rng_ranks=len(got.rng_states), python_state=got.rng_states[rank]["python"][1][-1],
                      optimizer=got.optimizer_state, weight=student.weight.tolist() if student else None)
    except Exception as exc:  # the test checks which rank raised what
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    Path(f"{out}.rank{rank}").write_text(json.dumps(record))


def _run(tmp_path: Path, run_dir, train_key: str, out_features: int = 2) -> list[dict]:
    """Both ranks' records; rank 0's student is a Linear(3, out_features) (the checkpoints': 2)."""
    out = tmp_path / "record"
    ctx = mp.start_processes(_worker, args=(free_port(), run_dir, train_key, str(out), out_features), nprocs=2,
                             join=False,
                             start_method="spawn")
    while not ctx.join(timeout=120):
        pass
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


def test_every_rank_resumes_the_checkpoint_rank_zero_verified(tmp_path):
    run_dir = tmp_path / "run"
    kept = _write_checkpoints(run_dir, tmp_path)
    rank0, rank1 = _run(tmp_path, run_dir, TRAIN_KEY)

    assert "error" not in rank0 and "error" not in rank1, (rank0, rank1)
    assert rank0["name"] == rank1["name"] == "checkpoint_000001"  # the newest fails its checksums
    assert rank0["position"] == rank1["position"] == [0, 4, 4, 32]
    assert rank0["weight"] == kept.weight.tolist()
    assert rank0["rng_ranks"] == rank1["rng_ranks"] == 2
    assert (rank0["python_state"], rank1["python_state"]) == (101, 111)  # each rank its own saved stream
    # mid-stage: the optimizer continues; rank 1 receives its state from rank 0 later (an empty dict now)
    assert rank0["optimizer"]["param_groups"][0]["lr"] == 0.1 and rank1["optimizer"] == {}
    assert rank0["downloaded"] == rank1["downloaded"] == []  # local storage is read in place
    assert rank0["verified_remote"] == [False, False] and rank1["verified_remote"] == []  # 000002 fails, 000001


def test_rank_zero_refusing_the_checkpoint_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    _write_checkpoints(run_dir, tmp_path)
    rank0, rank1 = _run(tmp_path, run_dir, "another-key")

    assert rank0["error"].startswith("RuntimeError: checkpoint ")
    assert "different training config" in rank0["error"]
    assert rank1["error"].startswith("RuntimeError: rank 0 failed, so rank 1 stops too: RuntimeError: checkpoint ")
    assert "use a new run_name" in rank1["error"]


def test_rank_zero_failing_to_load_the_chosen_checkpoint_stops_every_rank(tmp_path):
    """After the pick: rank 0's student does not match the checkpoint's weights, and rank 1 (which reads
    only the small files, and succeeds) stops with rank 0's error instead of going on to wait for it."""
    run_dir = tmp_path / "run"
    _write_checkpoints(run_dir, tmp_path)
    rank0, rank1 = _run(tmp_path, run_dir, TRAIN_KEY, out_features=4)

    assert "error" in rank0 and "rank 0 failed" not in rank0["error"], rank0
    assert rank1["error"].startswith("RuntimeError: rank 0 failed, so rank 1 stops too: ")
    assert rank1["error"].removeprefix("RuntimeError: rank 0 failed, so rank 1 stops too: ") == rank0["error"]


def test_a_rank_without_weights_downloads_only_the_small_files(tmp_path, s3_server, s3_bucket):
    run_dir = location(f"s3://{s3_bucket}/run", StorageConfig(endpoint_url=s3_server))
    kept = _write_checkpoints(run_dir, tmp_path)
    rank0, rank1 = _run(tmp_path, run_dir, TRAIN_KEY)

    assert "error" not in rank0 and "error" not in rank1, (rank0, rank1)
    assert rank0["name"] == rank1["name"] == "checkpoint_000001"
    assert rank0["weight"] == kept.weight.tolist()
    every_file = sorted([MANIFEST, "model.safetensors", "optimizer.pt", "position.json", "rng.pt", "scheduler.pt"])
    # rank 0 downloads each candidate once, newest first, and verifies the copies, never the store:
    # the damaged newest, then the one it resumes (read from that same copy)
    assert rank0["downloaded"] == [["download_dir", "checkpoint_000002", every_file],
                                   ["download_dir", "checkpoint_000001", every_file]]
    assert rank0["verified_remote"] == [False, False]
    assert rank1["downloaded"] == [["download_files", "checkpoint_000001",
                                    [MANIFEST, "position.json", "rng.pt", "scheduler.pt"]]]
    assert rank1["verified_remote"] == [False]  # its own download, checked locally
    assert (rank0["python_state"], rank1["python_state"]) == (101, 111)


def test_a_copy_of_ray_trains_latest_for_a_rank_without_weights_holds_only_the_small_files(tmp_path):
    import ray.train

    from tasks.distill_resume import RANK_FILES, _copy_latest

    run_dir = tmp_path / "run"
    _write_checkpoints(run_dir, tmp_path)
    latest = ray.train.Checkpoint(str(experiment_dir(run_dir) / "checkpoint_000001"))
    temp_dirs: list[str] = []
    small = _copy_latest(latest, temp_dirs, RANK_FILES)
    whole = _copy_latest(latest, temp_dirs)
    assert sorted(p.name for p in small.iterdir()) == [MANIFEST, "position.json", "rng.pt", "scheduler.pt"]
    assert sorted(p.name for p in whole.iterdir()) == sorted(
        [MANIFEST, "model.safetensors", "optimizer.pt", "position.json", "rng.pt", "scheduler.pt"])
    assert temp_dirs == [str(small), str(whole)]
    for d in temp_dirs:
        shutil.rmtree(d)
