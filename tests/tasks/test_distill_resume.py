"""Curriculum training on Ray Train: exact resume after SIGKILL, worker failure, DDP and FSDP == 1 worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocl_core.contracts import RunPaths
from tasks.distill import distill
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.report import read_train_metrics
from tasks.run_checkpoints import list_checkpoints
from tasks.score import score_difficulty

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# Two stages, long enough for a mid-stage kill; the same recipe in every test of this module.
# 20 steps in stage 0, 40 in stage 1, a checkpoint every 10 steps.
RECIPE = ["curriculum.num_stages=2", "curriculum.epochs_per_stage=2", "optim.global_batch_size=8",
          "optim.micro_batch_size=4", "train.checkpoint_every_steps=10", "data.max_train_samples=160"]


def _run_distill(make_config, run_name: str, *extra: str):
    cfg = make_config(*RECIPE, f"run_name={run_name}", *extra).with_absolute_paths()
    data = load_dataset.fn(cfg)
    part = partition.fn(cfg, score_difficulty.fn(cfg, data))
    return cfg, distill.fn(cfg, data, part)


def _weights(student_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(student_dir) / "model.safetensors"))


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


@pytest.fixture(scope="module")
def baseline(local_ray, tiny_models, tmp_path_factory):
    """The uninterrupted one-worker run everything else is compared with."""
    root = tmp_path_factory.mktemp("baseline-runs")

    def make(*overrides):
        from tests.conftest import TINY_CONFIG, TINY_DATA
        from pocl_core.config import load_config
        return load_config(TINY_CONFIG, [f"models.teacher={tiny_models.teacher}", f"models.student={tiny_models.student}",
                                         f"data.train_path={TINY_DATA}", f"runs_root={root}", *overrides])

    cfg, student = _run_distill(make, "uninterrupted", "ray.num_workers=1")
    return make, cfg, _weights(student)


def test_checkpoints_at_stage_boundaries_and_every_n_steps(baseline):
    _, cfg, _ = baseline
    positions = [json.loads((c / "position.json").read_text()) for c in list_checkpoints(cfg.run_dir)]
    boundaries = [p for p in positions if p["step_in_stage"] == 0]
    assert [p["stage"] for p in boundaries] == [1, 2]
    mid = [p for p in positions if p["step_in_stage"]]
    assert mid and all(p["step_in_stage"] % 10 == 0 for p in mid)
    metrics = [json.loads(line) for line in (RunPaths.of(cfg.run_dir).train_storage / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} == {0, 1}
    assert sorted({round(m["temperature"], 3) for m in metrics}) == [1.0, 2.0]


def test_two_worker_ddp_survives_a_killed_worker_and_equals_one_worker(baseline, tmp_path, monkeypatch):
    """2-worker DDP at the same global batch ends with the 1-worker weights, even though rank 0's
    process is SIGKILLed once mid-stage and Ray Train restarts the group from the last checkpoint."""
    make, _, reference = baseline
    marker = tmp_path / "fired"
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 12, "marker": str(marker), "kind": "kill"}))
    cfg, student = _run_distill(make, "ddp2-failure", "ray.num_workers=2", "ray.max_failures=1")
    assert marker.read_text() == "12"  # the fault did fire
    _assert_same_weights(_weights(student), reference, atol=1e-5)
    # the logged losses are means over the whole global batch, so they do not depend on the worker count
    one, two = (read_train_metrics(RunPaths.of(c.run_dir).train_metrics) for c in (baseline[1], cfg))
    assert [r["global_step"] for r in one] == [r["global_step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "kd_loss", "ce_loss", "kd_weight", "temperature"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["global_step"], key)


def test_sigkill_mid_stage_then_rerun_resumes_exactly(baseline, tmp_path):
    """The whole run (flow process, Prefect, Ray, worker) is SIGKILLed while rank 0 sits in stage 1
    right after the checkpoint of global step 30 (a ``hang`` fault holds it there, so the kill lands
    at a known point however fast the steps run); the rerun finishes it."""
    make, base_cfg, reference = baseline
    cfg = make(*RECIPE, "run_name=killed", "ray.num_workers=1", "ray.address=local")
    args = [f"{k}={v}" for k, v in (("models.teacher", cfg.models.teacher), ("models.student", cfg.models.student),
                                     ("data.train_path", cfg.data.train_path), ("runs_root", cfg.runs_root))]
    args += [*RECIPE, "run_name=killed", "ray.num_workers=1", "ray.address=local"]
    cmd = [sys.executable, "-m", "flows.pipeline", "--config", "configs/tiny.yaml", *args]
    marker = tmp_path / "hung"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "POCL_FAULT_INJECT": json.dumps({"at_global_step": 30, "marker": str(marker), "kind": "hang"})}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.1)
        killed_at = None
        if marker.exists():
            os.killpg(proc.pid, signal.SIGKILL)
            mid_stage_1 = [json.loads((c / "position.json").read_text()) for c in list_checkpoints(cfg.run_dir)]
            killed_at = [p for p in mid_stage_1 if p["stage"] == 1 and p["step_in_stage"] > 0][-1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at is not None, "the run ended or timed out before reaching global step 30"
    assert killed_at["global_step"] == 30
    paths = RunPaths.of(cfg.run_dir)
    assert not (paths.student / "model.safetensors").exists()
    before = {c.name for c in list_checkpoints(cfg.run_dir)}

    # restart with the same run name (in this process, on the session's Ray)
    _, student = _run_distill(make, "killed", "ray.num_workers=1")
    _assert_same_weights(_weights(student), reference)
    # The rerun continues from the newest complete checkpoint on disk (even one Ray Train had not yet
    # registered when the run was killed): nothing before it is redone, stage 0 least of all.
    positions = [json.loads((c / "position.json").read_text()) for c in list_checkpoints(base_cfg.run_dir)]
    stage0_steps = next(p["global_step"] for p in positions if p["stage"] == 1 and p["step_in_stage"] == 0)
    new = [json.loads((c / "position.json").read_text()) for c in list_checkpoints(cfg.run_dir) if c.name not in before]
    assert new and all(p["stage"] >= 1 for p in new)
    assert min(p["global_step"] for p in new) > max(stage0_steps, killed_at["global_step"])


def test_fsdp_two_workers_survive_a_worker_failure_and_match_one_worker(baseline, tmp_path, monkeypatch):
    """FSDP2 over 2 workers (CPU, gloo): same weights as the 1-worker run, also after a restart from a
    mid-stage checkpoint (sharded optimizer state saved in full and re-sharded), and the stage-0 student
    gathered from the shards equals that stage-boundary checkpoint."""
    make, _, reference = baseline
    marker = tmp_path / "fired"
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 12, "marker": str(marker), "kind": "raise"}))
    cfg, student = _run_distill(make, "fsdp2", "ray.num_workers=2", "ray.max_failures=1",
                                "train.parallel_strategy=fsdp", "eval.at_stage_boundaries=true")
    assert marker.read_text() == "12"
    _assert_same_weights(_weights(student), reference, atol=1e-5)
    boundary = next(c for c in list_checkpoints(cfg.run_dir)
                    if json.loads((c / "position.json").read_text())["stage"] == 1
                    and json.loads((c / "position.json").read_text())["step_in_stage"] == 0)
    stage0 = _weights(RunPaths.of(cfg.run_dir).stage_student(0))
    _assert_same_weights({k: v for k, v in load_file(str(boundary / "model.safetensors")).items() if k in stage0}, stage0)
