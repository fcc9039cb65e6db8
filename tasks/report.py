"""Task: the run report (report.md in the run folder) and the same as keyed Prefect artifacts."""

from __future__ import annotations

import json
import logging

import numpy as np
from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import RunPaths, read_table, write_text_atomic
from pocl_core.storage import Location
from pocl_core.schedule import plan_stages
from tasks.common import publish_markdown, publish_table, task_logger
from tasks.plots import plot_eval, plot_stage_rouge, plot_training, png_data_uri


# The training-log fields the report's table and plot read (a subset of TRAIN_METRICS_FIELDS); those
# in NULLABLE_FIELDS may also be null (ce_loss: a window of GKD on-policy steps only).
REPORTED_FIELDS = ("global_step", "stage", "loss", "kd_loss", "ce_loss", "tokens_per_s", "temperature")
NULLABLE_FIELDS = ("ce_loss",)


def read_train_metrics(path: Location) -> list[dict]:
    """Metric rows from the training log, the last row per global step (a resumed run may repeat some).

    A damaged line (a row torn by a killed run, then glued to the next run's first row), or a row
    without a number for every field the report shows (``REPORTED_FIELDS``: a hand-edited or foreign
    log), is skipped with a warning naming the file and line: the report never fails on the training log.
    """
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in REPORTED_FIELDS if not (k in NULLABLE_FIELDS and k in row and row[k] is None)
                       and (not isinstance(row.get(k), (int, float)) or isinstance(row.get(k), bool))]
            if missing:
                raise ValueError(f"no number for {', '.join(missing)}")
            rows[int(row["global_step"])] = row
        except (ValueError, TypeError, AttributeError) as exc:
            logging.getLogger("pocl").warning("report: skipping line %d of %s: %s", number, path, exc)
    return [rows[k] for k in sorted(rows)]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_report(cfg: PoclConfig, metrics: list[dict], train_rows: list[dict], partition_path: str | Location) -> str:
    part = read_table(partition_path).column("bucket").to_numpy()
    lines = [f"# POCL distillation report: `{cfg.run_name}`", "",
             f"- teacher: `{cfg.models.teacher}`", f"- student (initial): `{cfg.models.student}`",
             f"- loss: `{cfg.loss.name}` {cfg.loss.params or ''}", f"- strategy: `{cfg.curriculum.strategy}`, "
             + (f"one stage over every bucket with the optimizer steps of {cfg.curriculum.num_stages} stages × "
                f"{cfg.curriculum.epochs_per_stage} epoch(s)" if cfg.curriculum.strategy == "none" else
                f"{cfg.curriculum.num_stages} stages × {cfg.curriculum.epochs_per_stage} epoch(s)"), "",
             "## Held-out evaluation", "",
             "| model | ROUGE-L (×100) | ± std over seeds | greedy ROUGE-L | NLL (nats/token) |",
             "|---|---:|---:|---:|---:|"]
    # one seed has no spread to show (the stored std is 0)
    lines += [f"| {m['model']} | {m['rouge_l']:.2f} | {_fmt(m['rouge_l_std'] if m.get('num_seeds', 2) > 1 else None)} "
              f"| {_fmt(m.get('rouge_l_greedy'))} | {m['nll']:.3f} |" for m in metrics]
    # the stages as trained (the plain-KD baseline, strategy none, is one stage over every bucket)
    sizes = np.bincount(part, minlength=cfg.curriculum.num_stages).tolist()
    lines += ["", "## Stage plan", "", "| stage | buckets | samples | epochs | steps | temperature | KD weight λ |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for plan in plan_stages(cfg.curriculum, sizes, cfg.optim.global_batch_size):
        lines.append(f"| {plan.stage} | {min(plan.buckets)}..{max(plan.buckets)} | {plan.num_samples} | {plan.epochs} | "
                     f"{plan.num_steps} | {plan.temperature:.2f} | {plan.kd_weight:.2f} |")
    if train_rows:
        lines += ["", "## Training (last logged window of each stage)", "",
                  "| stage | global step | loss | KD | CE | tokens/s |", "|---:|---:|---:|---:|---:|---:|"]
        last = {r["stage"]: r for r in train_rows}
        for s in sorted(last):
            r = last[s]
            ce = "–" if r["ce_loss"] is None else f"{r['ce_loss']:.4f}"  # a window of on-policy steps only
            lines.append(f"| {s} | {r['global_step']} | {r['loss']:.4f} | {r['kd_loss']:.4f} | {ce} | "
                         f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


@task(name="report")
def report(cfg: PoclConfig, metrics_path: str, partition_path: str) -> str:
    """Write report.md and publish it (markdown + evaluation table artifacts); returns its path."""
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    metrics = read_table(paths.locate(metrics_path)).to_pylist()
    train_rows = read_train_metrics(paths.train_metrics)
    plots = {"eval": plot_eval(metrics, paths.plots_dir / "eval_rouge_l.png")}
    if any(m.get("stage") is not None for m in metrics):
        plots["stages"] = plot_stage_rouge(metrics, paths.plots_dir / "stage_rouge_l.png")
    if train_rows:
        plots["training"] = plot_training(train_rows, paths.plots_dir / "training_loss.png")
    histogram = paths.plots_dir / "difficulty_by_bucket.png"
    if histogram.is_file():
        plots["difficulty"] = histogram
    text = render_report(cfg, metrics, train_rows, paths.locate(partition_path))
    figures = "\n## Plots\n\n" + "\n".join(f"![{k}]({{src}}{p.name})" for k, p in plots.items()) + "\n"
    write_text_atomic(paths.report, text + figures.replace("{src}", "plots/"))
    embedded = text + "\n## Plots\n\n" + "\n".join(f"![{k}]({png_data_uri(p)})" for k, p in plots.items()) + "\n"
    publish_markdown("pocl-report", embedded, f"POCL report for run {cfg.run_name}")
    publish_table("pocl-eval", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} for m in metrics],
                  "held-out ROUGE-L and NLL per model")
    task_logger().info("report written to %s", paths.report)
    return str(paths.report)
