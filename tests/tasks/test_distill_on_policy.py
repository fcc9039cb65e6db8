"""GKD on-policy mixing inside the Ray Train loop: two DDP workers, decisions by (seed, step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocl_core.checkpoint import read_position, read_replay_buffers
from pocl_core.contracts import RunPaths
from pocl_core.on_policy import on_policy_step
from tasks.distill import distill, training_key
from tasks.distill_loop import _on_policy_mixer
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.run_checkpoints import list_checkpoints
from tasks.score import score_difficulty

pytestmark = pytest.mark.slow
SMALL = ["curriculum.num_stages=2", "data.max_train_samples=32", "optim.global_batch_size=8",
         "optim.micro_batch_size=4", "ray.num_workers=2", "train.log_every_steps=1", "loss.name=gjsd",
         "loss.on_policy_max_new_tokens=8"]


def test_on_policy_steps_follow_seed_and_step_under_ddp(local_ray, make_config):
    cfg = make_config(*SMALL, "loss.on_policy_fraction=0.5").with_absolute_paths()
    data = load_dataset.fn(cfg)
    part = partition.fn(cfg, score_difficulty.fn(cfg, data))
    distill.fn(cfg, data, part)
    rows = [json.loads(line) for line in (RunPaths.of(cfg.run_dir).train_storage / "metrics.jsonl").read_text().splitlines()]
    used = [r["on_policy_fraction"] for r in rows]
    assert [r["global_step"] for r in rows] == list(range(1, len(rows) + 1))
    assert used == [float(on_policy_step(cfg.seed, r["global_step"] - 1, 0.5)) for r in rows]
    assert 0 < sum(used) < len(used)  # both kinds of step ran
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)

    # Off (fraction 0): no mixer is built, and the other knobs do not touch the training key.
    off = make_config(*SMALL).with_absolute_paths()
    assert _on_policy_mixer(off, None, 0, None, 0, 0) is None
    tweaked = make_config(*SMALL, "loss.on_policy_temperature=0.5", "loss.on_policy_max_new_tokens=3")
    assert training_key(off, data, part) == training_key(tweaked.with_absolute_paths(), data, part)
    assert training_key(off, data, part) != training_key(cfg, data, part)


def test_replay_buffer_is_checkpointed_so_a_restarted_worker_continues_exactly(local_ray, make_config, tmp_path,
                                                                              monkeypatch):
    """GKD with a replay buffer: a worker that fails at step 15 and is restarted from the checkpoint of
    step 12 (max_failures=1) ends with the uninterrupted run's weights, because the checkpoint holds
    the buffer its later on-policy steps draw from."""
    recipe = ["curriculum.num_stages=2", "curriculum.epochs_per_stage=2", "data.max_train_samples=32",
              "optim.global_batch_size=4", "optim.micro_batch_size=4", "ray.num_workers=1",
              "train.checkpoint_every_steps=4", "loss.name=gjsd", "loss.on_policy_max_new_tokens=8",
              "loss.on_policy_fraction=0.5", "loss.replay_buffer_size=12"]
    seed = make_config(*recipe).seed
    # The test means something only if the buffer holds generations at step 12 and a step run only by
    # the restarted worker (after the fault at 15) draws from it.
    assert any(on_policy_step(seed, s, 0.5) for s in range(12))
    assert any(on_policy_step(seed, s, 0.5) for s in range(15, 24))

    def run(name: str, *extra: str):
        cfg = make_config(*recipe, f"run_name={name}", *extra).with_absolute_paths()
        data = load_dataset.fn(cfg)
        part = partition.fn(cfg, score_difficulty.fn(cfg, data))
        return cfg, distill.fn(cfg, data, part)

    _, reference = run("uninterrupted")
    marker = tmp_path / "fired"
    monkeypatch.setenv("POCL_FAULT_INJECT", json.dumps({"at_global_step": 15, "marker": str(marker), "kind": "raise"}))
    cfg, student = run("restarted", "ray.max_failures=1")
    assert marker.read_text() == "15"  # the fault did fire

    checkpoint = next(c for c in list_checkpoints(cfg.run_dir) if read_position(c).global_step == 12)
    buffers = read_replay_buffers(checkpoint)
    assert len(buffers) == 1 and 0 < len(buffers[0]) <= 12
    assert all(0 < e.n_response <= 8 for e in buffers[0])  # the student's generations, not the dataset's
    a, b = load_file(str(Path(reference) / "model.safetensors")), load_file(str(Path(student) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
