"""The evaluate task's reuse rule: its provenance names what the numbers depend on."""

from __future__ import annotations

import pytest

from pocl_core.contracts import RunPaths, StaleOutputError, read_metadata
from tasks.evaluate import evaluate
from tasks.load_data import load_dataset


def test_reuse_depends_on_the_teacher_dtype_and_the_nll_columns(make_config, tiny_models):
    cfg = make_config("run_name=eval", "eval.max_new_tokens=4", "data.max_eval_samples=4")
    data = load_dataset.fn(cfg)
    models = {"teacher": str(tiny_models.teacher)}
    metrics = RunPaths.of(cfg.run_dir).eval_metrics
    evaluate.fn(cfg, data, None, models)
    meta = read_metadata(metrics)
    # recorded even at the default float32, so a bfloat16 row is never taken for a float32 one
    assert meta["teacher_dtype"] == "float32" and meta["nll_columns"] == "tokenizer"
    written = metrics.stat().st_mtime_ns
    evaluate.fn(cfg, data, None, models)
    assert metrics.stat().st_mtime_ns == written  # same settings: reused

    bf16 = make_config("run_name=eval", "eval.max_new_tokens=4", "data.max_eval_samples=4",
                       "models.teacher_dtype=bfloat16")
    with pytest.raises(StaleOutputError, match=r"eval/metrics.parquet .*teacher_dtype: found 'float32', expected 'bfloat16'"):
        evaluate.fn(bf16, data, None, models)  # refused, not taken for a bfloat16 teacher's numbers
