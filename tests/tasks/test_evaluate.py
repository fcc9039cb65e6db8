"""The evaluate task's reuse rule: its provenance names what the numbers depend on."""

from __future__ import annotations

import pytest

from pocl_core.contracts import RunPaths, StaleOutputError, read_metadata, read_table
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


def test_a_killed_evaluation_redoes_only_the_unfinished_models(make_config, tiny_models, monkeypatch):
    import tasks.evaluate as evaluate_mod

    models = {"teacher": str(tiny_models.teacher), "initial_student": str(tiny_models.student)}
    settings = ("eval.max_new_tokens=4", "data.max_eval_samples=4")
    whole = make_config("run_name=whole", *settings)
    data = load_dataset.fn(whole)
    evaluate.fn(whole, data, None, models)

    killed = make_config("run_name=killed", *settings)
    killed_data = load_dataset.fn(killed)
    real, calls = evaluate_mod._evaluate_model, []

    def dies_on_the_student(cfg, name, *args):
        calls.append(name)
        if name == "initial_student":
            raise KeyboardInterrupt("killed")
        return real(cfg, name, *args)

    monkeypatch.setattr(evaluate_mod, "_evaluate_model", dies_on_the_student)
    with pytest.raises(KeyboardInterrupt):
        evaluate.fn(killed, killed_data, None, models)
    paths = RunPaths.of(killed.run_dir)
    assert not paths.eval_metrics.exists() and paths.eval_model_metrics("teacher").exists()

    monkeypatch.setattr(evaluate_mod, "_evaluate_model", lambda cfg, name, *a: calls.append(name) or real(cfg, name, *a))
    evaluate.fn(killed, killed_data, None, models)
    assert calls == ["teacher", "initial_student", "initial_student"]  # the teacher was not redone
    for file in ("eval_metrics", "generations"):
        got = read_table(getattr(paths, file))
        want = read_table(getattr(RunPaths.of(whole.run_dir), file))
        assert got.to_pylist() == want.to_pylist(), file


def test_a_model_evaluated_with_other_settings_is_redone(make_config, tiny_models):
    cfg = make_config("run_name=other", "eval.max_new_tokens=4", "data.max_eval_samples=4")
    data = load_dataset.fn(cfg)
    evaluate.fn(cfg, data, None, {"final_student": str(tiny_models.student)})
    paths = RunPaths.of(cfg.run_dir)
    with pytest.raises(StaleOutputError, match=r"eval/metrics.parquet .*models.final_student"):
        evaluate.fn(cfg, data, None, {"final_student": str(tiny_models.teacher)})  # a finished evaluation
    paths.eval_metrics.unlink()  # as the message says; the per-model files are partial results: redone
    evaluate.fn(cfg, data, None, {"final_student": str(tiny_models.teacher)})
    own = read_metadata(paths.eval_model_metrics("final_student"))["model"]
    assert own["fingerprint"] == read_metadata(paths.eval_metrics)["models"]["final_student"]
    assert read_metadata(paths.eval_model_generations("final_student"))["model"] == own
