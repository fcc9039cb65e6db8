"""Distilling from the scoring pass's teacher cache instead of a live teacher."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pocl_core.config import ConfigError
from tasks.distill import distill
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.score import score_difficulty

pytestmark = pytest.mark.slow
# Ray Train's local mode (the same loop in this process): the test is about the loss inputs, not Ray.
SMALL = ["curriculum.num_stages=2", "data.max_train_samples=64", "optim.global_batch_size=8", "optim.micro_batch_size=8",
         "ray.num_workers=0", "curriculum.temperature_end=1.5"]


def _train(make_config, *extra):
    cfg = make_config(*SMALL, *extra).with_absolute_paths()
    data = load_dataset.fn(cfg)
    scores = score_difficulty.fn(cfg, data)
    student = distill.fn(cfg, data, partition.fn(cfg, scores), scores.teacher_cache_dir)
    return load_file(f"{student}/model.safetensors")


def test_cache_with_k_equal_to_vocab_reproduces_the_live_teacher(make_config, tiny_models):
    from pocl_core.models import load_tokenizer

    vocab = len(load_tokenizer(str(tiny_models.student)))
    live = _train(make_config, "run_name=live")
    cached = _train(make_config, "run_name=cached", f"scoring.teacher_cache_topk={vocab}", "train.use_teacher_cache=true")
    for k in live:
        assert torch.allclose(live[k], cached[k], atol=2e-5, rtol=0), k


def test_cache_without_scoring_topk_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="scoring.teacher_cache_topk"):
        make_config("train.use_teacher_cache=true")
