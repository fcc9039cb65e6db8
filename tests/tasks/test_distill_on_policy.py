"""GKD on-policy mixing inside the Ray Train loop: two DDP workers, decisions by (seed, step)."""

from __future__ import annotations

import json
import math

import pytest

from pocl_core.contracts import RunPaths
from pocl_core.on_policy import on_policy_step
from tasks.distill import distill, training_key
from tasks.distill_loop import _on_policy_mixer
from tasks.load_data import load_dataset
from tasks.partition import partition
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
