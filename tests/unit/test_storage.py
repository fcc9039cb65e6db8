"""Run-folder locations: a local folder and an s3:// prefix (on a local moto server) behave the same."""

from __future__ import annotations

import pickle
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
import torch

from pocl_core.checkpoint import MANIFEST, CheckpointError, Position, load_checkpoint, read_position, save_checkpoint, \
    verify_checkpoint
from pocl_core.config import ConfigError, StorageConfig, load_config
from pocl_core.contracts import (PARTITION_SCHEMA, RunPaths, StaleOutputError, check_provenance, read_table_checked,
                                 write_table_atomic, write_text_atomic)
from pocl_core.storage import ObjectPath, append_text, fetch_dir, join, location, remove_tree, upload_dir
from tests.conftest import TINY_CONFIG

PARTITION = pa.table({"sample_id": ["a", "b"], "rank": [1, 0], "bucket": [0, 1]})


def test_local_paths_stay_pathlib_and_uris_keep_their_scheme(tmp_path):
    assert location(str(tmp_path)) == tmp_path and isinstance(location(str(tmp_path)), Path)
    assert join("runs", "a") == str(Path("runs", "a"))
    assert join("s3://bucket/prefix/", "run") == "s3://bucket/prefix/run"
    cfg = load_config(TINY_CONFIG, ["runs_root=s3://bucket/prefix", "run_name=r1"])
    assert cfg.run_dir == "s3://bucket/prefix/r1"
    assert cfg.with_absolute_paths().runs_root == "s3://bucket/prefix"
    with pytest.raises(ConfigError, match="runs_root.*unsupported storage URI"):
        load_config(TINY_CONFIG, ["runs_root=gs://bucket/prefix"])

    log = tmp_path / "train" / "metrics.jsonl"
    append_text(log, "a\n")
    append_text(log, "b\n")
    assert log.read_text() == "a\nb\n"
    remove_tree(tmp_path / "train")
    assert not (tmp_path / "train").exists()


def test_a_file_uri_runs_root_is_its_local_path(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"runs_root=file://{tmp_path}/my%20runs", "run_name=r1"])
    assert cfg.runs_root == f"{tmp_path}/my runs" and cfg.run_dir == str(tmp_path / "my runs" / "r1")
    assert isinstance(location(cfg.with_absolute_paths().run_dir), Path)
    assert load_config(TINY_CONFIG, ["runs_root=file://localhost/srv/runs"]).runs_root == "/srv/runs"
    for uri in ("file://otherhost/srv/runs", "file://runs"):
        with pytest.raises(ConfigError, match=f"runs_root {uri}: a file:// URI must name an absolute local folder"):
            load_config(TINY_CONFIG, [f"runs_root={uri}"])


def test_s3_run_folder_reads_writes_lists_and_pickles(s3_server, s3_bucket):
    paths = RunPaths.of(f"s3://{s3_bucket}/runs/r1", StorageConfig(endpoint_url=s3_server))
    assert isinstance(paths.root, ObjectPath)
    assert str(paths.partition) == f"s3://{s3_bucket}/runs/r1/partition.parquet"
    assert not paths.root.exists() and check_provenance(paths.partition, {"strategy": "curriculum"}) is False

    write_table_atomic(PARTITION, paths.partition, PARTITION_SCHEMA, {"strategy": "curriculum"})
    assert check_provenance(paths.partition, {"strategy": "curriculum"}) is True
    with pytest.raises(StaleOutputError, match=r"s3://.*partition.parquet.*strategy: found 'curriculum'"):
        check_provenance(paths.partition, {"strategy": "anti"})
    assert read_table_checked(paths.partition, PARTITION_SCHEMA).column("bucket").to_pylist() == [0, 1]
    write_text_atomic(paths.report, "# report\n")
    append_text(paths.train_metrics, "a\n")
    append_text(paths.train_metrics, "b\n")
    assert paths.train_metrics.read_text() == "a\nb\n"
    assert [p.name for p in paths.root.glob("*.parquet")] == ["partition.parquet"]
    assert paths.root.is_dir() and paths.train_storage.is_dir() and paths.report.is_file()

    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == ["runs/r1/partition.parquet", "runs/r1/report.md",
                                                "runs/r1/train/metrics.jsonl"]
    # As sent to a Ray worker: the location travels with its filesystem (the endpoint came from the config).
    clone = pickle.loads(pickle.dumps(paths.report))
    assert clone == paths.report and clone.read_text() == "# report\n"


def _checkpoint(folder: Path) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(folder, model, optimizer, scheduler, Position(1, 0, 4, 32))
    return model


def test_checkpoint_upload_verify_and_cached_download_on_s3(s3_server, s3_bucket, tmp_path):
    model = _checkpoint(tmp_path / "ckpt")
    remote = location(f"s3://{s3_bucket}/run/train/distill/checkpoint_0", StorageConfig(endpoint_url=s3_server))
    upload_dir(tmp_path / "ckpt", remote, last=MANIFEST)
    verify_checkpoint(remote)
    assert read_position(remote) == Position(1, 0, 4, 32)

    local = fetch_dir(remote, tmp_path / "cache", MANIFEST)
    assert local == tmp_path / "cache" / "s3" / s3_bucket / "run" / "train" / "distill" / "checkpoint_0"
    fresh = torch.nn.Linear(3, 2)
    assert load_checkpoint(local, model=fresh) == Position(1, 0, 4, 32)
    assert torch.equal(fresh.weight, model.weight)
    (local / "rng.pt").unlink()
    assert fetch_dir(remote, tmp_path / "cache", MANIFEST) == local and not (local / "rng.pt").exists()  # reused

    (remote / "position.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checksum mismatch for position.json"):
        verify_checkpoint(remote)
    with pytest.raises(ValueError, match="needs a local folder"):
        load_checkpoint(remote, model=fresh)
    remove_tree(remote)
    assert not remote.exists()


def test_files_and_folders_renamed_into_place_get_the_usual_modes(tmp_path):
    """Atomic writes go through tempfile (0600 files, 0700 folders); what lands has open()/mkdir()'s modes."""
    import os
    import stat

    from pocl_core.contracts import write_text_atomic
    from pocl_core.storage import UMASK

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~UMASK
    # a file being replaced keeps its own mode, as writing it in place would
    os.chmod(tmp_path / "atomic.txt", 0o640)
    write_text_atomic(tmp_path / "atomic.txt", "y")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == 0o640
    assert (tmp_path / "atomic.txt").read_text() == "y"

    # folders built in a tempfile.mkdtemp sibling and renamed in (converted models)
    from pocl_core.model_prep import build_atomically

    build_atomically(tmp_path / "model", {"v": 1}, lambda folder: (folder / "w").write_text("z"))
    (tmp_path / "made").mkdir()
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == stat.S_IMODE((tmp_path / "made").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o777 & ~UMASK
