"""The whole DAG on tiny models: Prefect flow, local Ray with 2 workers, every output checked."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pocl_core.checkpoint import load_checkpoint
from pocl_core.contracts import PARTITION_SCHEMA, RunPaths, read_metadata, scores_schema
from pocl_core.models import load_causal_lm, load_tokenizer
from tasks.run_checkpoints import list_checkpoints

pytestmark = pytest.mark.slow


def _mtimes(paths):
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_flow_end_to_end_with_two_ray_workers_and_idempotent_rerun(prefect_harness, local_ray, make_config, tmp_path):
    from flows.pipeline import pocl_distill

    overrides = [f"models.teacher={make_config().models.teacher}", f"models.student={make_config().models.student}",
                 f"data.train_path={make_config().data.train_path}", f"runs_root={tmp_path / 'runs'}",
                 "run_name=e2e", "ray.num_workers=2", "curriculum.num_stages=3", "eval.at_stage_boundaries=true"]
    summary = pocl_distill(config_path="configs/tiny.yaml", overrides=overrides)
    paths = RunPaths.of(summary.run_dir)
    assert Path(summary.run_dir) == tmp_path / "runs" / "e2e"

    # scores and partition follow their schemas; every training sample is scored once and bucketed
    shards = sorted(paths.scores_dir.glob("part-*.parquet"))
    assert shards
    scores = pq.read_table(shards)
    assert scores.schema.remove_metadata() == scores_schema(["nll"])
    train_ids = set(pq.read_table(paths.train_data).column("sample_id").to_pylist())
    assert set(scores.column("sample_id").to_pylist()) == train_ids
    assert sorted(scores.column("rank").to_pylist()) == list(range(len(train_ids)))
    part = pq.read_table(paths.partition)
    assert part.schema.remove_metadata() == PARTITION_SCHEMA
    assert read_metadata(paths.partition)["num_buckets"] == 3
    assert sorted(set(part.column("bucket").to_pylist())) == [0, 1, 2]

    # a checkpoint per stage boundary, and the student reloads through from_pretrained
    ckpts = list_checkpoints(paths.root)
    positions = [json.loads((c / "position.json").read_text())["stage"] for c in ckpts]
    assert positions == [1, 2, 3]
    student = load_causal_lm(summary.student)
    tokenizer = load_tokenizer(summary.student)
    assert (Path(summary.student) / "model.safetensors").is_file()
    initial = load_causal_lm(str(make_config().models.student))
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), initial.state_dict().values()))
    assert len(tokenizer) == student.config.vocab_size

    # the students saved at stage boundaries hold the weights of those stage-boundary checkpoints
    by_stage = {json.loads((c / "position.json").read_text())["stage"]: c for c in ckpts}
    for stage in (0, 1):
        saved = load_causal_lm(str(paths.stage_student(stage))).state_dict()
        expected = load_causal_lm(str(make_config().models.student))
        load_checkpoint(by_stage[stage + 1], model=expected)
        assert all(torch.equal(saved[k], v) for k, v in expected.state_dict().items())
    assert not paths.stage_student(2).exists()  # the last stage's student is the final one

    # evaluation (sampled and greedy ROUGE-L, NLL; per-stage students) and report
    metrics = {r["model"]: r for r in pq.read_table(summary.metrics).to_pylist()}
    assert set(metrics) == {"teacher", "initial_student", "after_stage_0", "after_stage_1", "final_student"}
    assert [metrics[m]["stage"] for m in ("after_stage_0", "after_stage_1", "final_student")] == [0, 1, None]
    assert all(0.0 <= m["rouge_l_greedy"] <= 100.0 for m in metrics.values())
    assert metrics["final_student"]["nll"] < metrics["initial_student"]["nll"]
    gens = pq.read_table(paths.generations).to_pylist()
    greedy = [g for g in gens if g["decoding"] == "greedy"]
    n_eval = pq.read_table(paths.eval_data).num_rows
    assert len(greedy) == 5 * n_eval and len(gens) == 5 * n_eval * 2  # one sampled seed + one greedy pass
    mean_greedy = 100 * sum(g["rouge_l"] for g in greedy if g["model"] == "final_student") / n_eval
    assert metrics["final_student"]["rouge_l_greedy"] == pytest.approx(mean_greedy)
    report = Path(summary.report).read_text()
    assert "final_student" in report and "| 2 | 0..2 |" in report and "after_stage_1" in report
    for png in ("eval_rouge_l.png", "training_loss.png", "stage_rouge_l.png"):
        assert (paths.plots_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}" in report

    # the same report is published as keyed Prefect artifacts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pocl-report", "pocl-eval", "partition-buckets", "distill"])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"pocl-report", "pocl-eval", "partition-buckets", "distill"}
    assert "data:image/png;base64," in by_key["pocl-report"].data
    assert by_key["pocl-report"].type == "markdown" and by_key["pocl-eval"].type == "table"
    assert by_key["distill"].type == "progress" and float(by_key["distill"].data) == 100.0  # training progress

    # rerun with the same run name: scoring, partitioning and training are reused, not redone
    watched = [*shards, *sorted((paths.scores_dir / "measures").glob("*.parquet")), paths.partition,
               paths.student / "model.safetensors", paths.eval_metrics]
    before = _mtimes(watched)
    again = pocl_distill(config_path="configs/tiny.yaml", overrides=overrides)
    assert again.student == summary.student
    assert _mtimes(watched) == before
    assert list_checkpoints(paths.root) == ckpts

    # a rerun with another training recipe is refused before any Ray work (its checkpoints would mix
    # two trainings), and config.yaml still describes the run that produced the folder
    config_text = paths.config.read_text()
    with pytest.raises(RuntimeError, match="checkpoint\\(s\\) of another training config.*new run_name.*"
                                           "differ from .*config.yaml: optim.lr: .* → 0.01"):
        pocl_distill(config_path="configs/tiny.yaml", overrides=[*overrides, "optim.lr=0.01"])
    assert paths.config.read_text() == config_text and "lr: 0.01" not in config_text
    assert list_checkpoints(paths.root) == ckpts
