"""Task: evaluate teacher, initial student, per-stage students (optional) and final student on the held-out split.

A model kept in a remote run folder (the students of an ``s3://`` run) is downloaded first to
``storage.model_cache_dir`` (``<cache>/s3/<bucket>/<key>``; reused while its provenance file is
unchanged), since Hugging Face ``from_pretrained`` loads from local folders.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pyarrow as pa
from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import (EVAL_METRICS_SCHEMA, GENERATIONS_SCHEMA, STUDENT_PROVENANCE, RunPaths,
                                 StaleOutputError, check_provenance, read_table, write_table_atomic)
from pocl_core.data import table_to_samples
from pocl_core.evaluate import evaluate_generations, mean_response_nll, summarize_rouge
from pocl_core.models import decode_only_as_configured, load_causal_lm, load_tokenizer, model_fingerprint, resolve_device
from pocl_core.schedule import num_trained_stages
from pocl_core.storage import Location, ObjectPath, fetch_dir, is_remote, location
from tasks.common import Progress, task_logger
from tasks.load_data import DatasetSplits


STAGE_PREFIX = "after_stage_"


def models_to_evaluate(cfg: PoclConfig, student_path: str) -> dict[str, str]:
    """Name -> folder: teacher, initial student, ``after_stage_<s>`` students (with
    eval.at_stage_boundaries; every stage but the last, whose student is the final one), final student."""
    models = {"teacher": cfg.models.teacher, "initial_student": cfg.models.student}
    if cfg.eval.at_stage_boundaries:
        paths = RunPaths.of(cfg.run_dir, cfg.storage)
        for stage in range(num_trained_stages(cfg.curriculum) - 1):
            folder = paths.stage_student(stage)
            if folder.is_dir():
                models[f"{STAGE_PREFIX}{stage}"] = str(folder)
            else:
                task_logger().warning("no student saved at the end of stage %d (%s): the run was trained without "
                                      "eval.at_stage_boundaries; use a new run_name to get per-stage students",
                                      stage, folder)
    models["final_student"] = student_path
    return models


def _stage_of(name: str) -> int | None:
    return int(name[len(STAGE_PREFIX):]) if name.startswith(STAGE_PREFIX) else None


def local_model(cfg: PoclConfig, path: str) -> str:
    """``path`` itself, or for a model in a remote run folder its local copy in ``storage.model_cache_dir``."""
    if not is_remote(path):
        return path
    src = location(path, cfg.storage)
    assert isinstance(src, ObjectPath)
    return str(fetch_dir(src, cfg.storage.model_cache_dir, STUDENT_PROVENANCE))


def _model_provenance(provenance: dict, name: str) -> dict:
    """What one model's evaluation depends on: the shared settings and that model's weights (and dtype)."""
    own = {k: v for k, v in provenance.items() if k not in ("models", "teacher_dtype")}
    own["model"] = {"name": name, "fingerprint": provenance["models"][name]}
    if name == "teacher":
        own["teacher_dtype"] = provenance["teacher_dtype"]
    return own


def _finished(own: dict, gen_file: Location, metrics_file: Location) -> bool:
    """Whether one model's files hold its evaluation under ``own`` settings. Files from other settings
    are redone, not refused: they are partial results, and the combined files' check above already
    refuses a finished evaluation made with other settings."""
    try:
        return check_provenance(metrics_file, own) and check_provenance(gen_file, own)
    except StaleOutputError:
        task_logger().info("re-evaluating: %s was made with other settings", metrics_file.parent)
        return False


def _evaluate_model(cfg: PoclConfig, name: str, path: str, tokenizer, samples: list, device) -> tuple[list[dict], dict]:
    """One model's generation rows and metrics row (GENERATIONS_SCHEMA / EVAL_METRICS_SCHEMA)."""
    dtype = cfg.models.teacher_dtype if name == "teacher" else "float32"
    model = decode_only_as_configured(load_causal_lm(path, dtype, cfg.models.trust_remote_code, device).eval())
    common = dict(template=cfg.data.prompt_template, max_prompt_length=cfg.data.max_prompt_length, device=device)
    gens = evaluate_generations(model, tokenizer, samples, cfg=cfg.eval, **common)
    nll = mean_response_nll(model, tokenizer, samples, max_length=cfg.data.max_length,
                            batch_size=cfg.eval.batch_size, **common)
    rouge, rouge_std = summarize_rouge(gens, "sampled" if cfg.eval.do_sample else "greedy")
    greedy, _ = summarize_rouge(gens, "greedy")
    spread = f" ± {rouge_std:.2f} over {len(cfg.eval.seeds)} seeds" if len(cfg.eval.seeds) > 1 else ""
    task_logger().info("%s: ROUGE-L %.2f%s (greedy %.2f), NLL %.3f", name, rouge, spread, greedy, nll)
    row = {"model": name, "rouge_l": rouge, "rouge_l_std": rouge_std,
           "rouge_l_greedy": None if math.isnan(greedy) else greedy, "nll": nll,
           "stage": _stage_of(name), "num_samples": len(samples), "num_seeds": len(cfg.eval.seeds)}
    return [{"model": name, **asdict(g)} for g in gens], row


@task(name="evaluate")
def evaluate(cfg: PoclConfig, data: DatasetSplits, student_path: str | None,
             models: dict[str, str] | None = None) -> str:
    """Write eval/generations.parquet and eval/metrics.parquet; returns the metrics path.

    Evaluates teacher, initial student and ``student_path`` (the final student), or exactly the
    ``models`` given (name -> folder) when set.
    """
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    if models is None:
        if student_path is None:
            raise ValueError("evaluate needs student_path or an explicit models mapping")
        models = models_to_evaluate(cfg, student_path)
    models = {name: local_model(cfg, p) for name, p in models.items()}
    provenance = {"eval": cfg.eval.model_dump(mode="json"), "eval_data": data.eval_fingerprint,
                  "models": {name: model_fingerprint(p) for name, p in models.items()},
                  "nll_columns": "tokenizer"}  # the NLL's softmax spans the tokenizer's columns only
    if "teacher" in models:  # the teacher row's numerics
        provenance["teacher_dtype"] = cfg.models.teacher_dtype
    if check_provenance(paths.eval_metrics, provenance) and paths.generations.exists():
        log.info("reusing evaluation in %s", paths.eval_dir)
        return str(paths.eval_metrics)

    samples = table_to_samples(read_table(paths.locate(data.eval_path)))
    device = resolve_device(cfg.ray.use_gpu)
    tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
    gen_tables, metric_tables = [], []
    progress = Progress("evaluate", len(models), "evaluating models")
    for done, (name, path) in enumerate(models.items(), start=1):
        # each model's rows are kept as soon as it is done: a run killed mid-evaluation redoes only the rest
        own = _model_provenance(provenance, name)
        gen_file, metrics_file = paths.eval_model_generations(name), paths.eval_model_metrics(name)
        if _finished(own, gen_file, metrics_file):
            log.info("%s: reusing its evaluation in %s", name, metrics_file.parent)
        else:
            gens, row = _evaluate_model(cfg, name, path, tokenizer, samples, device)
            write_table_atomic(pa.Table.from_pylist(gens), gen_file, GENERATIONS_SCHEMA, own)
            write_table_atomic(pa.Table.from_pylist([row]), metrics_file, EVAL_METRICS_SCHEMA, own)
        gen_tables.append(read_table(gen_file))
        metric_tables.append(read_table(metrics_file))
        progress.update(done)
    write_table_atomic(pa.concat_tables(gen_tables), paths.generations, GENERATIONS_SCHEMA, provenance)
    write_table_atomic(pa.concat_tables(metric_tables), paths.eval_metrics, EVAL_METRICS_SCHEMA, provenance)
    return str(paths.eval_metrics)
