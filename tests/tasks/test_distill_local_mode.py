"""ray.num_workers=0: the training loop runs in-process (Ray Train's local mode), with no Ray cluster."""

from __future__ import annotations

import json
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file

from pocl_core.checkpoint import read_position, verify_checkpoint
from pocl_core.contracts import STUDENT_PROVENANCE, TRAIN_METRICS_FIELDS, RunPaths
from pocl_core.models import weights_digest
from tasks.distill import distill
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.report import read_train_metrics
from tasks.run_checkpoints import experiment_dir, list_checkpoints
from tasks.score import score_difficulty

pytestmark = pytest.mark.slow


def test_local_mode_trains_in_process_keeps_its_checkpoints_and_resumes_from_them(make_config):
    ray_was_up = ray.is_initialized()
    cfg = make_config("ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=48",
                      "optim.global_batch_size=8", "optim.micro_batch_size=8", "run_name=local").with_absolute_paths()
    data = load_dataset.fn(cfg)
    scores = score_difficulty.fn(cfg, data)
    part = partition.fn(cfg, scores)
    student = distill.fn(cfg, data, part, scores.teacher_cache_dir)
    assert ray.is_initialized() == ray_was_up  # no Ray started for local mode

    paths = RunPaths.of(cfg.run_dir)
    ckpts = list_checkpoints(paths.root)
    assert [json.loads((c / "position.json").read_text())["stage"] for c in ckpts] == [1, 2]
    for c in ckpts:
        verify_checkpoint(c)
    weights = load_file(f"{student}/model.safetensors")
    metrics = paths.train_storage / "metrics.jsonl"
    rows = metrics.read_text()
    parsed = [json.loads(line) for line in rows.splitlines()]
    assert parsed and all(set(r) == set(TRAIN_METRICS_FIELDS) for r in parsed)  # the contract's fields, exactly
    assert json.loads((paths.student / STUDENT_PROVENANCE).read_text())["weights"] == weights_digest(student)

    # without the saved student, a rerun resumes from the final in-place checkpoint: no step is redone
    shutil.rmtree(student)
    again = distill.fn(cfg, data, part, scores.teacher_cache_dir)
    assert metrics.read_text() == rows
    resumed = load_file(f"{again}/model.safetensors")
    assert resumed.keys() == weights.keys() and all((resumed[k] == weights[k]).all() for k in weights)


def test_a_run_failing_at_a_stage_boundary_resumes_its_rng_streams(make_config, tiny_models, tmp_path, monkeypatch):
    """A student with dropout (random masks every step): a run stopped by a failure right after the
    stage-0 boundary checkpoint and started again ends with the uninterrupted run's exact weights,
    because the checkpoint carries the RNG streams and the resumed stage continues them."""
    student = tmp_path / "dropout-student"
    shutil.copytree(tiny_models.student, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    recipe = ("ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=48", "optim.global_batch_size=8",
              "optim.micro_batch_size=4", f"models.student={student}")

    def run(name: str) -> tuple[str, dict]:
        cfg = make_config(*recipe, f"run_name={name}").with_absolute_paths()
        data = load_dataset.fn(cfg)
        part = partition.fn(cfg, score_difficulty.fn(cfg, data))
        return cfg.run_dir, load_file(f"{distill.fn(cfg, data, part)}/model.safetensors")

    run_dir, reference = run("uninterrupted")
    boundary = next(json.loads((c / "position.json").read_text()) for c in list_checkpoints(run_dir)
                    if json.loads((c / "position.json").read_text())["stage"] == 1)
    marker = tmp_path / "fired"
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": boundary["global_step"],
                                                       "marker": str(marker), "kind": "raise"}))
    with pytest.raises(Exception, match="injected fault"):
        run("interrupted")
    assert marker.exists()
    _, resumed = run("interrupted")  # the marker keeps the fault from firing again
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), \
        max((resumed[k] - reference[k]).abs().max().item() for k in reference)


def test_keep_checkpoints_also_prunes_what_ray_train_never_registered(make_config, tmp_path, monkeypatch):
    """Local mode's checkpoints (the loop writes them itself) and those of a failed attempt are pruned
    to train.keep_checkpoints when training ends, with the leftovers of an interrupted write."""
    cfg = make_config("ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=48",
                      "optim.global_batch_size=8", "optim.micro_batch_size=8", "train.checkpoint_every_steps=1",
                      "train.keep_checkpoints=2", "run_name=pruned").with_absolute_paths()
    data = load_dataset.fn(cfg)
    part = partition.fn(cfg, score_difficulty.fn(cfg, data))
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 4, "marker": str(tmp_path / "fired"),
                                                       "kind": "raise"}))
    with pytest.raises(Exception, match="injected fault"):
        distill.fn(cfg, data, part)
    assert [read_position(c).global_step for c in list_checkpoints(cfg.run_dir)] == [1, 2, 3, 4]
    leftover = experiment_dir(cfg.run_dir) / "checkpoint_999.tmp"
    leftover.mkdir()

    distill.fn(cfg, data, part)
    kept = [read_position(c) for c in list_checkpoints(cfg.run_dir)]
    assert len(kept) == 2 and kept[-1].stage == 2 and kept[-1].step_in_stage == 0  # the end of the last stage
    assert kept[0].global_step == kept[-1].global_step - 1
    assert not leftover.exists()
    assert sorted(p.name for p in experiment_dir(cfg.run_dir).glob("checkpoint_*")) == \
        sorted(c.name for c in list_checkpoints(cfg.run_dir))


def test_a_run_resumed_mid_stage_logs_the_metrics_rows_of_an_uninterrupted_one(make_config, tmp_path, monkeypatch):
    """Windows end at checkpoints too (every 2 steps here, logging every 3): the resumed attempt's
    rows, which replace the failed attempt's after its last checkpoint, equal the uninterrupted run's."""
    recipe = ("ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=48", "optim.global_batch_size=8",
              "optim.micro_batch_size=8", "train.checkpoint_every_steps=2", "train.log_every_steps=3")

    def run(name: str) -> list[dict]:
        cfg = make_config(*recipe, f"run_name={name}").with_absolute_paths()
        data = load_dataset.fn(cfg)
        distill.fn(cfg, data, partition.fn(cfg, score_difficulty.fn(cfg, data)))
        return read_train_metrics(RunPaths.of(cfg.run_dir).train_metrics)

    reference = run("whole")
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 6, "marker": str(tmp_path / "fired"),
                                                       "kind": "raise"}))
    with pytest.raises(Exception, match="injected fault"):
        run("resumed")
    resumed = run("resumed")  # from the checkpoint of global step 5 (stage 1, step 2); step 6 is done again
    assert [r["global_step"] for r in resumed] == [r["global_step"] for r in reference]
    # stage 0: steps 1-3, stage 1: steps 4-9; rows at checkpoints (every 2 in a stage, stage ends) and logs (3)
    assert [(r["stage"], r["step_in_stage"]) for r in reference][:5] == [(0, 2), (0, 3), (1, 2), (1, 3), (1, 4)]
    for a, b in zip(reference, resumed):
        for key in ("loss", "kd_loss", "ce_loss", "lr", "samples_seen", "step_in_stage"):
            assert b[key] == a[key], (a["global_step"], key)


def test_float16_autocast_scales_the_loss_and_resumes_the_scale(make_config, tmp_path, monkeypatch, caplog):
    """float16 autocast trains through a GradScaler whose state each checkpoint keeps: a run failing
    right after the stage-0 boundary and started again ends with the uninterrupted run's weights. A
    warm-up as long as a stage is named in a warning."""
    from pocl_core.checkpoint import GRAD_SCALER_KEY

    recipe = ("ray.num_workers=0", "curriculum.num_stages=2", "data.max_train_samples=32", "optim.global_batch_size=8",
              "optim.micro_batch_size=4", "train.autocast_dtype=float16", "optim.warmup_steps=50")

    def run(name: str) -> tuple[str, dict]:
        cfg = make_config(*recipe, f"run_name={name}").with_absolute_paths()
        data = load_dataset.fn(cfg)
        part = partition.fn(cfg, score_difficulty.fn(cfg, data))
        return cfg.run_dir, load_file(f"{distill.fn(cfg, data, part)}/model.safetensors")

    with caplog.at_level("WARNING", logger="pocl"):
        run_dir, reference = run("whole")
    assert "optim.warmup_steps (50) is not below the 2 optimizer steps" in caplog.text
    positions = [json.loads((c / "position.json").read_text()) for c in list_checkpoints(run_dir)]
    scales = [p[GRAD_SCALER_KEY]["scale"] for p in positions]
    assert len(scales) == 2 and all(s > 1.0 for s in scales)  # a loss scale was in use and saved
    assert all(torch.isfinite(v).all() for v in reference.values())

    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": positions[0]["global_step"],
                                                       "marker": str(tmp_path / "fired"), "kind": "raise"}))
    with pytest.raises(Exception, match="injected fault"):
        run("resumed")
    resumed_dir, resumed = run("resumed")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # the scaler continued (its growth tracker counts the steps since the last overflow, across the resume)
    last = json.loads((list_checkpoints(resumed_dir)[-1] / "position.json").read_text())
    assert last[GRAD_SCALER_KEY] == positions[-1][GRAD_SCALER_KEY] and last["global_step"] > positions[0]["global_step"]
    assert positions[-1][GRAD_SCALER_KEY]["_growth_tracker"] == positions[-1]["global_step"]  # no overflow here
