"""What the training loop feeds the loss: each stage's samples, λ and T, token-mean steps under
gradient accumulation, and the top-k teacher cache in place of the live teacher.

Ray Train's local mode (ray.num_workers=0): the loop runs in this process, so its calls can be recorded.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import tasks.distill_loop as loop
from pocl_core.contracts import RunPaths
from pocl_core.teacher_cache import TeacherCache
from tasks.distill import distill
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.score import score_difficulty

pytestmark = pytest.mark.slow


def _prepare(make_config, *overrides: str):
    cfg = make_config("ray.num_workers=0", *overrides).with_absolute_paths()
    data = load_dataset.fn(cfg)
    scores = score_difficulty.fn(cfg, data)
    return cfg, data, partition.fn(cfg, scores), scores


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in RunPaths.of(cfg.run_dir).train_metrics.read_text().splitlines()]


@contextmanager
def _recording(monkeypatch) -> Iterator[list[list[dict]]]:
    """Per optimizer step, the micro-batches the loop passed to the loss: sample ids, T, λ, tokens."""
    steps: list[list[dict]] = [[]]
    collate, losses = loop.collate, loop.distillation_losses

    def recording_collate(mb, pad):
        steps[-1].append({"ids": [e.sample_id for e in mb]})
        return collate(mb, pad)

    def recording_losses(*args, **kwargs):
        out = losses(*args, **kwargs)
        steps[-1][-1].update(temperature=kwargs["temperature"], kd_weight=kwargs["kd_weight"], tokens=out.num_tokens)
        return out

    handle = register_optimizer_step_post_hook(lambda *_: steps.append([]))
    with monkeypatch.context() as patch:
        patch.setattr(loop, "collate", recording_collate)
        patch.setattr(loop, "distillation_losses", recording_losses)
        try:
            yield steps
        finally:
            handle.remove()
            steps.pop()  # opened by the last step


def test_each_stage_trains_on_its_buckets_at_its_temperature_and_kd_weight(make_config, monkeypatch):
    """Stage s's steps use only samples of buckets 0..s (partition.parquet), every one of them once per
    epoch, at T_s and λ_s of the linear schedule start + (end − start)·s/(K − 1)."""
    k, epochs, batch = 3, 2, 8
    cfg, data, part, _ = _prepare(make_config, f"curriculum.num_stages={k}", f"curriculum.epochs_per_stage={epochs}",
                                  "data.max_train_samples=24", f"optim.global_batch_size={batch}",
                                  "optim.micro_batch_size=4", "curriculum.temperature_start=1.0",
                                  "curriculum.temperature_end=2.0", "curriculum.kd_weight_start=0.4",
                                  "curriculum.kd_weight_end=1.0", "run_name=schedule")
    with _recording(monkeypatch) as steps:
        distill.fn(cfg, data, part)

    table = pq.read_table(part).to_pydict()
    bucket = dict(zip(table["sample_id"], table["bucket"]))
    at = 0
    for s in range(k):
        members = {i for i, b in bucket.items() if b <= s}
        per_epoch = math.ceil(len(members) / batch)
        temperature, kd_weight = 1.0 + (2.0 - 1.0) * s / (k - 1), 0.4 + (1.0 - 0.4) * s / (k - 1)
        for epoch in range(epochs):
            epoch_steps = steps[at:at + per_epoch]
            at += per_epoch
            ids = Counter(i for step in epoch_steps for mb in step for i in mb["ids"])
            assert set(ids) == members, (s, epoch)
            assert sum(ids.values()) == per_epoch * batch and all(len(step) == 2 for step in epoch_steps)
            if len(members) % batch == 0:
                assert set(ids.values()) == {1}, (s, epoch)
            used = [mb for step in epoch_steps for mb in step]
            assert [mb["temperature"] for mb in used] == pytest.approx([temperature] * len(used)), (s, epoch)
            assert [mb["kd_weight"] for mb in used] == pytest.approx([kd_weight] * len(used)), (s, epoch)
    assert at == len(steps)
    rows = _metrics(cfg)
    assert [r["global_step"] for r in rows][-1] == len(steps)


def test_a_step_is_one_token_mean_whatever_the_micro_batch(make_config, monkeypatch):
    """Micro-batches of 2 and of 8 at a global batch of 8 (responses of unequal length): the same
    logged losses and, after training, the same weights."""
    recipe = ("curriculum.num_stages=2", "data.max_train_samples=32", "optim.global_batch_size=8",
              "train.log_every_steps=1")
    runs = {}
    for micro in (2, 8):
        cfg, data, part, _ = _prepare(make_config, *recipe, f"optim.micro_batch_size={micro}", f"run_name=micro{micro}")
        with _recording(monkeypatch) as steps:
            student = distill.fn(cfg, data, part)
        runs[micro] = steps, _metrics(cfg), load_file(f"{student}/model.safetensors")

    small_steps, small_rows, small = runs[2]
    whole_steps, whole_rows, whole = runs[8]
    assert len(small_steps) == len(whole_steps) and all(len(s) == 4 for s in small_steps)
    assert all(len(s) == 1 for s in whole_steps)
    assert any(len({mb["tokens"] for mb in s}) > 1 for s in small_steps)  # micro-batches of unequal token counts
    assert len(small_rows) == len(whole_rows) == len(whole_steps)
    for a, b in zip(small_rows, whole_rows):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["global_step"], key)
    assert small.keys() == whole.keys()
    for name in whole:
        assert torch.allclose(small[name], whole[name], rtol=0, atol=1e-5), \
            f"{name}: max diff {(small[name] - whole[name]).abs().max():.3g}"


def test_top_k_teacher_cache_trains_without_the_live_teacher(make_config, monkeypatch):
    """With a cache of k = 50 < V columns the loop never loads the teacher model, its losses are finite,
    and its student differs from the live teacher's."""
    recipe = ("curriculum.num_stages=2", "data.max_train_samples=32", "optim.global_batch_size=8",
              "optim.micro_batch_size=8", "train.log_every_steps=1", "scoring.teacher_cache_topk=50")
    cfg, data, part, _ = _prepare(make_config, *recipe, "run_name=live")
    live = load_file(f"{distill.fn(cfg, data, part)}/model.safetensors")

    cfg, data, part, scores = _prepare(make_config, *recipe, "train.use_teacher_cache=true", "run_name=cached")
    cache = TeacherCache.load(scores.teacher_cache_dir)
    assert cache.k == 50 < cache.metadata["vocab_columns"]
    load_causal_lm = loop.load_causal_lm
    teacher = Path(cfg.models.teacher).resolve()

    def no_teacher(name, *args, **kwargs):
        if Path(name).resolve() == teacher:
            raise AssertionError("the live teacher was loaded in a cached run")
        return load_causal_lm(name, *args, **kwargs)

    monkeypatch.setattr(loop, "load_causal_lm", no_teacher)
    cached = load_file(f"{distill.fn(cfg, data, part, scores.teacher_cache_dir)}/model.safetensors")

    rows = _metrics(cfg)
    assert rows and all(math.isfinite(r[key]) for r in rows for key in ("loss", "kd_loss", "ce_loss"))
    assert all(torch.isfinite(v).all() for v in cached.values())
    assert cached.keys() == live.keys()
    assert max((cached[k] - live[k]).abs().max().item() for k in live) > 1e-4
