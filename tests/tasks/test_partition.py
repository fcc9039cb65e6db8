"""The partition task: buckets from the reported score shards, the summary table and the histogram."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pocl_core.config import load_config
from pocl_core.contracts import RunPaths, StaleOutputError
from pocl_core.partition import bucket_sizes
from tasks.load_data import load_dataset
from tasks.partition import PLOT_NAME, bucket_summary, partition
from tasks.score import score_difficulty

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scored(tiny_models, tiny_data_path, tmp_path_factory):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"models.teacher={tiny_models.teacher}", f"models.student={tiny_models.student}",
        f"data.train_path={tiny_data_path}", f"runs_root={tmp_path_factory.mktemp('runs')}", "run_name=part",
        "data.max_train_samples=70", "scoring.shard_size=32", "curriculum.num_stages=3"])
    return cfg, score_difficulty.fn(cfg, load_dataset.fn(cfg))


def test_partition_writes_buckets_summary_and_a_png_histogram(scored):
    cfg, scores = scored
    out = partition.fn(cfg, scores)
    paths = RunPaths.of(cfg.run_dir)
    part = pq.read_table(out).to_pydict()
    assert sorted(np.bincount(part["bucket"]).tolist(), reverse=True) == bucket_sizes(70, 3)
    ranks, buckets = np.asarray(part["rank"]), np.asarray(part["bucket"])
    assert all(ranks[buckets == b].max() < ranks[buckets == b + 1].min() for b in range(2))  # easy → hard
    png = paths.plots_dir / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list(paths.plots_dir.glob("*.tmp"))

    mtime = png.stat().st_mtime_ns
    assert partition.fn(cfg, scores) == out and png.stat().st_mtime_ns == mtime  # reused, not redone


def test_bucket_summary_means_by_hand():
    buckets = np.array([0, 1, 0, 2, 1], dtype=np.int16)
    difficulty = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    rows = bucket_summary(buckets, 4, difficulty, {"nll": difficulty * 2})
    assert rows == [
        {"bucket": 0, "samples": 2, "mean_difficulty": 1.5, "mean_nll": 3.0},
        {"bucket": 1, "samples": 2, "mean_difficulty": 3.5, "mean_nll": 7.0},
        {"bucket": 2, "samples": 1, "mean_difficulty": 5.0, "mean_nll": 10.0},
        {"bucket": 3, "samples": 0, "mean_difficulty": None, "mean_nll": None},
    ]


def test_partition_reads_only_reported_shards_and_refuses_other_scores(scored, tmp_path):
    cfg, scores = scored
    run = tmp_path / "copy"
    shutil.copytree(Path(cfg.run_dir) / "scores", run / "scores")
    copy_cfg = cfg.model_copy(update={"runs_root": str(tmp_path), "run_name": "copy"})
    copied = replace(scores, scores_dir=str(run / "scores"))
    # a stray shard from some other run is ignored: only part-00000 .. part-{n-1} are read
    shutil.copy(run / "scores" / "part-00000.parquet", run / "scores" / "part-00099.parquet")
    partition.fn(copy_cfg, copied)
    assert len(pq.read_table(RunPaths.of(run).partition)) == 70

    with pytest.raises(StaleOutputError, match=r"scores/part-00000\.parquet .*scores_key"):
        partition.fn(copy_cfg.model_copy(update={"run_name": "copy2"}), replace(copied, scores_key="0123456789abcdef"))
    (run / "scores" / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"part-00001\.parquet is missing"):
        partition.fn(copy_cfg.model_copy(update={"run_name": "copy3"}), copied)


def test_more_stages_than_samples_leave_empty_buckets_with_a_warning(scored, tmp_path, caplog):
    cfg, scores = scored
    run = tmp_path / "many"
    shutil.copytree(Path(cfg.run_dir) / "scores", run / "scores")
    many = cfg.model_copy(update={"runs_root": str(tmp_path), "run_name": "many",
                                  "curriculum": cfg.curriculum.model_copy(update={"num_stages": 72})})
    with caplog.at_level("WARNING", logger="pocl"):
        partition.fn(many, replace(scores, scores_dir=str(run / "scores")))
    buckets = pq.read_table(RunPaths.of(run).partition).column("bucket").to_pylist()
    assert sorted(buckets) == list(range(70))  # one sample per bucket, the last two empty
    assert "curriculum.num_stages=72 exceeds the 70 training samples: bucket(s) [70, 71] are empty" in caplog.text


@pytest.mark.slow
def test_partition_publishes_table_and_plot_artifacts(scored, prefect_harness, tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact

    cfg, scores = scored
    other = cfg.model_copy(update={"run_name": "artifacts", "runs_root": str(tmp_path)})

    @flow
    def run_partition():
        return partition(other, scores)

    run_partition()
    table = Artifact.get("partition-buckets")
    plot = Artifact.get("partition-difficulty-plot")
    assert table is not None and "mean_difficulty" in str(table.data)
    assert plot is not None and str(RunPaths.of(other.run_dir).plots_dir / PLOT_NAME) in plot.data


def test_a_partition_killed_before_its_plot_is_redone_with_the_plot(scored, tmp_path, monkeypatch):
    """partition.parquet marks the step done, so it is written last: a failure while plotting leaves
    no partition behind, and the rerun writes both."""
    import tasks.partition as partition_mod

    cfg, scores = scored
    cfg = cfg.model_copy(update={"run_name": "part-killed"})
    scores = replace(scores, scores_dir=str(shutil.copytree(scores.scores_dir, tmp_path / "scores")))
    paths = RunPaths.of(cfg.run_dir)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while plotting")

    with monkeypatch.context() as m:
        m.setattr(partition_mod, "plot_difficulty_by_bucket", crash)
        with pytest.raises(RuntimeError, match="killed while plotting"):
            partition.fn(cfg, scores)
    assert not paths.partition.exists()
    partition.fn(cfg, scores)
    assert paths.partition.exists() and (paths.plots_dir / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
