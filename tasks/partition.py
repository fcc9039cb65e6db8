"""Task: assign every scored sample to a curriculum bucket (``partition.parquet``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import PARTITION_SCHEMA, RunPaths, check_provenance, write_table_atomic
from pocl_core.partition import bucket_sizes, partition_by_rank
from tasks.common import publish_table, task_logger
from tasks.score import ScoresResult


def partition_provenance(cfg: PoclConfig, scores: ScoresResult) -> dict:
    c = cfg.curriculum
    return {"scores_key": scores.scores_key, "num_buckets": c.num_stages, "strategy": c.strategy,
            "seed": c.shuffle_seed}


@task(name="partition")
def partition(cfg: PoclConfig, scores: ScoresResult) -> str:
    """Write partition.parquet (sample_id, rank, bucket) and publish bucket sizes; returns its path."""
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir)
    provenance = partition_provenance(cfg, scores)
    if check_provenance(paths.partition, provenance):
        log.info("reusing %s", paths.partition)
        return str(paths.partition)
    table = pq.read_table(sorted(paths.scores_dir.glob("part-*.parquet")))
    ranks = table.column("rank").to_numpy()
    buckets = partition_by_rank(ranks, cfg.curriculum.num_stages, cfg.curriculum.strategy, cfg.curriculum.shuffle_seed)
    out = pa.table({"sample_id": table.column("sample_id"), "rank": pa.array(ranks), "bucket": pa.array(buckets)})
    out = out.sort_by([("bucket", "ascending"), ("rank", "ascending")])
    write_table_atomic(out, paths.partition, PARTITION_SCHEMA, provenance)
    difficulty = table.column("difficulty").to_numpy()
    rows = [
        {"bucket": b, "samples": int((buckets == b).sum()),
         "mean_difficulty": round(float(difficulty[buckets == b].mean()), 4) if (buckets == b).any() else None}
        for b in range(cfg.curriculum.num_stages)
    ]
    assert [r["samples"] for r in rows] == bucket_sizes(len(ranks), cfg.curriculum.num_stages)
    publish_table("partition-buckets", rows, "samples and mean difficulty per curriculum bucket")
    log.info("partitioned %d samples into %d buckets (%s): %s", len(ranks), cfg.curriculum.num_stages,
             cfg.curriculum.strategy, [r["samples"] for r in rows])
    return str(paths.partition)
