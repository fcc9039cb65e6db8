"""Task: assign every scored sample to a curriculum bucket (``partition.parquet``) and show the split.

Reads exactly the score shards the scoring task reported (``part-00000`` … ``part-{n-1}``) and
refuses any whose ``scores_key`` differs from it. Publishes, besides the Parquet file:

* a table artifact ``partition-buckets``: samples, mean difficulty and the mean of every measure
  per bucket;
* ``<run>/plots/difficulty_by_bucket.png``: a histogram of difficulty per bucket (matplotlib,
  Agg canvas, no pyplot state). Prefect's image artifacts only take a URL the browser can fetch
  (``create_image_artifact(image_url=...)``), and a run folder is a local path or object store,
  so the plot is published as a markdown artifact ``partition-difficulty-plot`` naming the PNG's
  path together with the per-bucket summary.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import PARTITION_SCHEMA, RunPaths, check_provenance, read_table, write_table_atomic
from pocl_core.partition import partition_by_rank
from pocl_core.storage import Location, location
from tasks.common import publish_markdown, publish_table, task_logger
from tasks.score import ScoresResult

PLOT_NAME = "difficulty_by_bucket.png"


def partition_provenance(cfg: PoclConfig, scores: ScoresResult) -> dict:
    c = cfg.curriculum
    return {"scores_key": scores.scores_key, "num_buckets": c.num_stages, "strategy": c.strategy,
            "seed": c.shuffle_seed}


def read_scores(scores: ScoresResult, scores_dir: Location | None = None) -> pa.Table:
    """The scores table from the reported shards, after checking each shard's scores_key.

    ``scores_dir``: ``scores.scores_dir`` as a location on the run folder's filesystem (default: the
    string resolved with the environment's storage settings).
    """
    folder = scores_dir if scores_dir is not None else location(scores.scores_dir)
    paths = [folder / f"part-{i:05d}.parquet" for i in range(scores.num_shards)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"score shard {path} is missing; rerun the scoring task")
        check_provenance(path, {"scores_key": scores.scores_key})
    table = read_table(paths)
    ids = table.column("sample_id").to_pylist()
    if not ids:
        raise ValueError(f"{scores.scores_dir}: the score shards hold no samples")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{scores.scores_dir}: sample '{dup}' is scored more than once; delete the scores and rerun")
    return table


@task(name="partition")
def partition(cfg: PoclConfig, scores: ScoresResult) -> str:
    """Write partition.parquet (sample_id, rank, bucket), the bucket table and plot; returns its path."""
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    provenance = partition_provenance(cfg, scores)
    if check_provenance(paths.partition, provenance):
        log.info("reusing %s", paths.partition)
        return str(paths.partition)
    table = read_scores(scores, paths.locate(scores.scores_dir))
    ranks = table.column("rank").to_numpy()
    k = cfg.curriculum.num_stages
    buckets = partition_by_rank(ranks, k, cfg.curriculum.strategy, cfg.curriculum.shuffle_seed)
    out = pa.table({"sample_id": table.column("sample_id"), "rank": pa.array(ranks), "bucket": pa.array(buckets)})
    out = out.sort_by([("bucket", "ascending"), ("rank", "ascending")])

    # the table, plot and artifacts first: partition.parquet marks the step done, so it goes last
    difficulty = table.column("difficulty").to_numpy()
    measures = [m for m in cfg.scoring.measures if m in table.column_names]
    rows = bucket_summary(buckets, k, difficulty, {m: table.column(m).to_numpy() for m in measures})
    publish_table("partition-buckets", rows, "samples, mean difficulty and mean measures per curriculum bucket")
    title = f"{cfg.run_name}: difficulty by bucket ({cfg.curriculum.strategy}, {cfg.scoring.fusion} of " \
            f"{'+'.join(cfg.scoring.measures)})"
    plot = plot_difficulty_by_bucket(difficulty, buckets, k, paths.plots_dir / PLOT_NAME, title)
    publish_markdown("partition-difficulty-plot", _plot_markdown(plot, rows),
                     "histogram of difficulty per curriculum bucket (PNG in the run folder)")
    write_table_atomic(out, paths.partition, PARTITION_SCHEMA, provenance)
    log.info("partitioned %d samples into %d buckets (%s): %s; plot %s", len(ranks), k,
             cfg.curriculum.strategy, [r["samples"] for r in rows], plot)
    empty = [r["bucket"] for r in rows if r["samples"] == 0]
    if empty:
        log.warning("curriculum.num_stages=%d exceeds the %d training samples: bucket(s) %s are empty, so "
                    "stage(s) %s add no new samples and repeat the stage before at a new temperature; lower "
                    "curriculum.num_stages or train on more samples", k, len(ranks), empty, empty)
    return str(paths.partition)


def bucket_summary(buckets: np.ndarray, num_buckets: int, difficulty: np.ndarray,
                   measures: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per bucket: ``bucket``, ``samples``, ``mean_difficulty`` and ``mean_<measure>`` (None if empty)."""
    rows = []
    for b in range(num_buckets):
        sel = buckets == b
        row: dict[str, Any] = {"bucket": b, "samples": int(sel.sum())}
        for name, values in {"difficulty": difficulty, **measures}.items():
            row[f"mean_{name}"] = round(float(values[sel].mean()), 4) if sel.any() else None
        rows.append(row)
    return rows


def plot_difficulty_by_bucket(difficulty: np.ndarray, buckets: np.ndarray, num_buckets: int, path: Location,
                              title: str) -> Location:
    """Save overlaid step histograms of ``difficulty`` (float [N]) per bucket (int [N]) as a PNG, atomically."""
    from tasks.plots import figure, save_png  # matplotlib is imported when a plot is drawn

    fig, ax = figure(7.0, 4.0, dpi=100)
    finite = difficulty[np.isfinite(difficulty)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    for b in range(num_buckets):
        values = difficulty[buckets == b]
        if values.size:
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"bucket {b} (n={values.size})")
    ax.set_xlabel("difficulty (higher = harder)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _plot_markdown(plot: Location, rows: Sequence[dict[str, Any]]) -> str:
    header = list(rows[0]) if rows else ["bucket", "samples"]
    lines = ["# Difficulty by curriculum bucket", "",
             f"Histogram: `{plot.resolve()}` (PNG in the run folder; Prefect image artifacts need a URL).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"
