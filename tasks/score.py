"""Task: score every training sample's difficulty with one model, in resumable Parquet shards.

Phase 1 writes raw measures per shard (``scores/measures/part-*.parquet``, samples sorted by id,
``scoring.shard_size`` per shard); a rerun skips shards that are complete and refuses shards
produced from another model, dataset or measurer config. Phase 2 fuses the measures into one
difficulty and an easy-first rank and writes ``scores/part-*.parquet`` with the same sharding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import (RunPaths, check_provenance, measures_schema, read_table_checked, scores_schema,
                                 write_table_atomic)
from pocl_core.data import encode_sample, pad_id_of, table_to_samples
from pocl_core.difficulty import fuse_difficulty
from pocl_core.measures import ScoringContext, get_measure, length_sorted_batches
from pocl_core.models import load_causal_lm, load_tokenizer, model_fingerprint, resolve_device
from tasks.common import Progress, task_logger
from tasks.load_data import DatasetSplits


@dataclass(frozen=True)
class ScoresResult:
    scores_dir: str
    num_shards: int
    scores_key: str  # hash of everything the scores depend on; downstream provenance


def scoring_provenance(cfg: PoclConfig, data: DatasetSplits) -> dict:
    """What the measures depend on: scorer weights, dataset, measures and tokenization settings."""
    scorer = cfg.models.teacher if cfg.scoring.model == "teacher" else cfg.models.student
    return {
        "scorer": scorer,
        "scorer_fingerprint": model_fingerprint(scorer),
        "dataset_fingerprint": data.train_fingerprint,
        "measurer": {"measures": cfg.scoring.measures, "template": cfg.data.prompt_template,
                     "max_prompt_length": cfg.data.max_prompt_length, "max_length": cfg.data.max_length},
    }


@task(name="score-difficulty")
def score_difficulty(cfg: PoclConfig, data: DatasetSplits) -> ScoresResult:
    """Compute missing measure shards, then fuse into difficulty + rank; returns the scores folder."""
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir)
    provenance = scoring_provenance(cfg, data)
    fused_provenance = {**provenance, "fusion": {"fusion": cfg.scoring.fusion, "rrf_k": cfg.scoring.rrf_k}}
    key = hashlib.sha256(json.dumps(fused_provenance, sort_keys=True).encode()).hexdigest()[:16]
    fused_provenance["scores_key"] = key

    samples = sorted(table_to_samples(pq.read_table(data.train_path)), key=lambda s: s.sample_id)
    size = cfg.scoring.shard_size
    shards = [samples[i:i + size] for i in range(0, len(samples), size)]
    if all(check_provenance(paths.score_shard(i), fused_provenance) for i in range(len(shards))):
        log.info("reusing %d finished score shards in %s", len(shards), paths.scores_dir)
        return ScoresResult(str(paths.scores_dir), len(shards), key)

    todo = [i for i in range(len(shards)) if not check_provenance(paths.measures_shard(i), provenance)]
    if todo:
        log.info("scoring %d of %d shards with %s", len(todo), len(shards), provenance["scorer"])
        _score_shards(cfg, provenance, shards, todo, paths)

    m_schema = measures_schema(cfg.scoring.measures)
    table = pa.concat_tables([read_table_checked(paths.measures_shard(i), m_schema) for i in range(len(shards))])
    ids = table.column("sample_id").to_pylist()
    difficulty, rank = fuse_difficulty(
        ids, {m: table.column(m).to_numpy() for m in cfg.scoring.measures}, cfg.scoring.fusion, cfg.scoring.rrf_k)
    table = table.append_column("difficulty", pa.array(difficulty)).append_column("rank", pa.array(rank))
    s_schema = scores_schema(cfg.scoring.measures)
    offset = 0
    for i, shard in enumerate(shards):
        write_table_atomic(table.slice(offset, len(shard)), paths.score_shard(i), s_schema, fused_provenance)
        offset += len(shard)
    log.info("wrote %d score shards (%d samples) to %s", len(shards), len(ids), paths.scores_dir)
    return ScoresResult(str(paths.scores_dir), len(shards), key)


def _score_shards(cfg: PoclConfig, provenance: dict, shards: list, todo: list[int], paths: RunPaths) -> None:
    device = resolve_device(cfg.ray.use_gpu)
    dtype = cfg.models.teacher_dtype if cfg.scoring.model == "teacher" else "float32"
    model = load_causal_lm(provenance["scorer"], dtype, cfg.models.trust_remote_code, device).eval()
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.student, cfg.models.trust_remote_code)
    ctx = ScoringContext(model, tokenizer, pad_id_of(tokenizer), device)
    measures = {m: get_measure(m) for m in cfg.scoring.measures}
    schema = measures_schema(cfg.scoring.measures)
    progress = Progress("score-difficulty", len(todo), "scoring shards")
    for done, i in enumerate(todo, start=1):
        encoded = [encode_sample(tokenizer, s, cfg.data.prompt_template, cfg.data.max_prompt_length,
                                 cfg.data.max_length) for s in shards[i]]
        values: dict[str, dict[str, float]] = {m: {} for m in measures}
        with torch.inference_mode():
            for batch in length_sorted_batches(encoded, cfg.scoring.batch_size):
                for name, fn in measures.items():
                    values[name].update(zip((e.sample_id for e in batch), fn(ctx, batch)))
        columns = {
            "sample_id": [e.sample_id for e in encoded],
            "n_prompt_tokens": [e.n_prompt for e in encoded],
            "n_response_tokens": [e.n_response for e in encoded],
        }
        for name in measures:
            columns[name] = [values[name][e.sample_id] for e in encoded]
        write_table_atomic(pa.table(columns), paths.measures_shard(i), schema, provenance)
        progress.update(done)
