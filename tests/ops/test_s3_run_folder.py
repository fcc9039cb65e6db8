"""The tiny flow with its run folder in an S3-compatible object store (a local moto server)."""

from __future__ import annotations

import json

import boto3
import pytest
import torch
from safetensors.torch import load as load_safetensors

from pocl_core.checkpoint import read_position, verify_checkpoint
from pocl_core.config import StorageConfig
from pocl_core.contracts import RunPaths, read_table
from pocl_core.models import load_causal_lm
from pocl_core.storage import download_dir, remove_tree
from tasks.distill import distill
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.run_checkpoints import list_checkpoints
from tasks.score import score_difficulty
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow

RECIPE = ["ray.num_workers=1", "curriculum.num_stages=2", "data.max_train_samples=64", "data.max_eval_samples=8",
          "eval.max_new_tokens=8"]


def _keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                                Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def test_tiny_flow_with_run_folder_on_s3(prefect_harness, local_ray, make_config, s3_server, s3_bucket, tmp_path,
                                         monkeypatch):
    from flows.pipeline import pocl_distill

    # The worker fails once mid-stage 1; Ray Train restarts it, and it resumes from the stage-0
    # checkpoint it lists, verifies and downloads from the bucket.
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 3, "marker": str(marker)}))
    base = make_config()
    root = f"s3://{s3_bucket}/experiments"
    cache = tmp_path / "run-models"
    overrides = [f"models.teacher={base.models.teacher}", f"models.student={base.models.student}",
                 f"data.train_path={base.data.train_path}", f"runs_root={root}", f"storage.endpoint_url={s3_server}",
                 f"storage.model_cache_dir={cache}", "run_name=s3run", "ray.max_failures=1",
                 "eval.at_stage_boundaries=true", *RECIPE]
    summary = pocl_distill(config_path=str(TINY_CONFIG), overrides=overrides)
    assert marker.read_text() == "3"
    assert summary.run_dir == f"{root}/s3run" and summary.student == f"{root}/s3run/student"

    # Every output is an object under the run's prefix.
    keys = _keys(s3_server, s3_bucket, "experiments/s3run/")
    assert {"config.yaml", "data/train.parquet", "data/eval.parquet", "scores/part-00000.parquet",
            "scores/measures/part-00000.parquet", "partition.parquet", "train/metrics.jsonl",
            "student/model.safetensors", "student/config.json", "student/pocl_provenance.json",
            "eval/generations.parquet", "eval/metrics.parquet", "report.md", "plots/eval_rouge_l.png",
            "plots/training_loss.png", "plots/difficulty_by_bucket.png", "stages/stage_0/model.safetensors",
            "stages/stage_0/pocl_provenance.json"} <= keys
    manifests = [k for k in keys if k.startswith("train/distill/checkpoint_") and k.endswith("/manifest.json")]
    assert len(manifests) == 2  # one checkpoint per stage boundary, uploaded by Ray Train

    # The checkpoints are listed, verified and read through the same filesystem. Stage 1 began once:
    # the restarted worker resumed from the stage-0 checkpoint instead of starting over.
    paths = RunPaths.of(summary.run_dir, StorageConfig(endpoint_url=s3_server))
    ckpts = list_checkpoints(paths.root)
    assert [read_position(c).stage for c in ckpts] == [1, 2]
    verify_checkpoint(ckpts[-1])

    # The student, downloaded and loaded with from_pretrained, holds the final checkpoint's weights.
    student = load_causal_lm(str(download_dir(paths.student, tmp_path / "student")))
    reported = load_safetensors((ckpts[-1] / "model.safetensors").read_bytes())
    initial = load_causal_lm(base.models.student).state_dict()
    name = "lm_head.weight" if "lm_head.weight" in reported else next(iter(reported))
    assert torch.equal(student.state_dict()[name], reported[name])
    assert not torch.equal(student.state_dict()[name], initial[name])

    # Evaluation loaded the student from its local cache copy; the report lies in the bucket.
    assert (cache / "s3" / s3_bucket / "experiments" / "s3run" / "student" / "model.safetensors").is_file()
    metrics = {r["model"]: r for r in read_table(paths.locate(summary.metrics)).to_pylist()}
    assert set(metrics) == {"teacher", "initial_student", "after_stage_0", "final_student"}
    assert metrics["final_student"]["nll"] < metrics["initial_student"]["nll"]
    assert "final_student" in paths.report.read_text()


def test_local_mode_keeps_checkpoints_in_the_bucket_and_resumes_from_them(make_config, s3_server, s3_bucket):
    """ray.num_workers=0 (Ray Train's local mode): the loop uploads its checkpoints itself."""
    cfg = make_config(f"runs_root=s3://{s3_bucket}/local", f"storage.endpoint_url={s3_server}", "run_name=r0",
                      "ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=48",
                      "optim.global_batch_size=8", "optim.micro_batch_size=8").with_absolute_paths()
    data = load_dataset.fn(cfg)
    scores = score_difficulty.fn(cfg, data)
    part = partition.fn(cfg, scores)
    student = distill.fn(cfg, data, part, scores.teacher_cache_dir)
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    assert student == str(paths.student) and paths.student_provenance.is_file()
    assert [read_position(c).stage for c in list_checkpoints(paths.root)] == [1, 2]
    weights = load_safetensors((paths.student / "model.safetensors").read_bytes())
    rows = paths.train_metrics.read_text()

    # Without the saved student, a rerun resumes from the newest checkpoint in the bucket: no step is redone.
    remove_tree(paths.student)
    assert distill.fn(cfg, data, part, scores.teacher_cache_dir) == student
    assert paths.train_metrics.read_text() == rows
    resumed = load_safetensors((paths.student / "model.safetensors").read_bytes())
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)
