"""Task: score every training sample's difficulty with one model, in resumable Parquet shards.

Samples are sorted by id and cut into shards of ``scoring.shard_size``; a shard is the unit of
work, of resume and of parallelism. Phase 1 writes, per shard, the raw measures
(``scores/measures/part-*.parquet``) and, with ``scoring.teacher_cache_topk > 0``, the teacher's
top-k logits from the same forward pass (``teacher_cache/part-*.parquet``). Inside a shard the
samples run in length-sorted batches, with no gradients, in ``models.teacher_dtype`` when the
teacher scores. With ``scoring.num_workers`` 1 the shards run in this process; with more, each
shard is one Ray task (at most ``num_workers`` in flight, one GPU each when ``ray.use_gpu``) that
loads the scoring model and writes its own shard files. Phase 2 fuses the measures into one
difficulty and an easy-first rank and writes ``scores/part-*.parquet`` with the same sharding.

Every file carries its provenance (scorer weights fingerprint and dtype, dataset fingerprint,
tokenization, measures, generation settings of generative measures, shard size). A rerun skips
shards whose files are complete and match, computes only the missing ones, and refuses (raises
``StaleOutputError`` naming the file and the differing keys) files made from other inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from prefect import task

from pocl_core.config import ConfigError, PoclConfig
from pocl_core.contracts import (RunPaths, check_provenance, measures_schema, read_metadata, read_table,
                                 read_table_checked, scores_schema, teacher_cache_schema, write_table_atomic)
from pocl_core.data import Sample, table_to_samples
from pocl_core.encoding import encode_sample, pad_id_of
from pocl_core.difficulty import fuse_difficulty
from pocl_core.losses.sparse import temperature_covered
from pocl_core.measures import (GENERATIVE_MEASURES, ScoringContext, get_measure, length_sorted_batches,
                                logit_columns, score_batch)
from pocl_core.models import (config_vocab_size, decode_only_as_configured, load_causal_lm, load_tokenizer,
                              model_fingerprint, resolve_device, tokenizer_fingerprint)
from pocl_core.schedule import schedule_temperatures
from pocl_core.storage import Location, for_workers
from pocl_core.teacher_cache import CACHE_SHARD_VALUES, cache_table, largest_fitting_shard_size
from pocl_core.vocab import check_vocab_compatible
from tasks.common import Progress, task_logger
from tasks.load_data import DatasetSplits


@dataclass(frozen=True)
class ScoresResult:
    scores_dir: str
    num_shards: int
    scores_key: str  # hash of everything the scores depend on; downstream provenance
    teacher_cache_dir: str | None = None  # teacher_cache/ when scoring.teacher_cache_topk > 0


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: its samples (sorted by id) and which of its files are missing."""

    index: int
    samples: list[Sample]
    measures: bool
    cache: bool
    num_shards: int  # of the whole pass (recorded in each cache shard)


def _scorer(cfg: PoclConfig) -> tuple[str, str]:
    """(model path, dtype) of the scoring model: the teacher in teacher_dtype, or the student in float32."""
    if cfg.scoring.model == "teacher":
        return cfg.models.teacher, cfg.models.teacher_dtype
    return cfg.models.student, "float32"


def _pass_provenance(cfg: PoclConfig, data: DatasetSplits) -> dict[str, Any]:
    scorer, dtype = _scorer(cfg)
    return {  # the scorer by its role and contents, not its path: a moved checkout or another host still matches
        "scorer": cfg.scoring.model,
        "scorer_fingerprint": model_fingerprint(scorer),
        "scorer_dtype": dtype,
        "dataset_fingerprint": data.train_fingerprint,
        "shard_size": cfg.scoring.shard_size,
    }


def _tokenization(cfg: PoclConfig) -> dict[str, Any]:
    """How samples become token ids: the tokenizer's files, the prompt template and the length limits."""
    return {"tokenizer": tokenizer_fingerprint(cfg.models.tokenizer_source), "template": cfg.data.prompt_template,
            "max_prompt_length": cfg.data.max_prompt_length, "max_length": cfg.data.max_length,
            "prompt_truncation": "user-text"}  # encoding.encode_prompt cuts the user text, keeping the template


def scoring_provenance(cfg: PoclConfig, data: DatasetSplits) -> dict[str, Any]:
    """What the raw measures depend on: scorer weights and dtype, dataset, measures, tokenization."""
    # token measures read the logits of the tokenizer's columns only (not a padded embedding's extra rows)
    measurer: dict[str, Any] = {"measures": cfg.scoring.measures, "logit_columns": "tokenizer", **_tokenization(cfg)}
    if GENERATIVE_MEASURES.intersection(cfg.scoring.measures):
        generation = cfg.scoring.generation.model_dump(mode="json")
        if not generation["do_sample"]:  # greedy decoding reads none of the sampling settings
            for unused in ("temperature", "top_k", "top_p", "seed"):
                generation.pop(unused)
        measurer["generation"] = generation
    return {**_pass_provenance(cfg, data), "measurer": measurer}


def cache_provenance(cfg: PoclConfig, data: DatasetSplits, temperatures: Sequence[float] | None = None
                     ) -> dict[str, Any]:
    """What the teacher cache depends on: teacher weights and dtype, dataset, tokenization, top-k, and the
    temperatures whose tail log-sum-exps it stores (default: every temperature of the curriculum)."""
    temps = schedule_temperatures(cfg.curriculum) if temperatures is None else temperatures
    return {**_pass_provenance(cfg, data), "tokenization": _tokenization(cfg), "topk": cfg.scoring.teacher_cache_topk,
            "temperatures": [float(t) for t in temps]}


def cache_temperatures(cfg: PoclConfig, paths: RunPaths, num_shards: int) -> list[float]:
    """The temperatures the run's cache shards store: those of the shards already written when they
    cover every temperature of the curriculum (a rerun with fewer or other-but-stored temperatures
    reuses them, and new shards match them), else the curriculum's own (older shards are then stale)."""
    needed = schedule_temperatures(cfg.curriculum)
    for i in range(num_shards):
        shard = paths.teacher_cache_shard(i)
        if shard.exists():
            stored = [float(t) for t in read_metadata(shard).get("temperatures", [])]
            covered = all(temperature_covered(stored, t) for t in needed)
            return stored if covered and stored else list(needed)
    return list(needed)


@task(name="score-difficulty")
def score_difficulty(cfg: PoclConfig, data: DatasetSplits) -> ScoresResult:
    """Compute missing shards (measures and teacher cache), then fuse into difficulty + rank."""
    log = task_logger()
    if cfg.scoring.fusion == "single" and len(cfg.scoring.measures) > 1:
        log.warning("scoring.fusion=single: the curriculum follows %s alone; %s are computed and stored but do "
                    "not order it (scoring.fusion=rrf fuses them all)", cfg.scoring.measures[0],
                    ", ".join(cfg.scoring.measures[1:]))
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    provenance = scoring_provenance(cfg, data)
    fused_provenance = {**provenance, "fusion": {"fusion": cfg.scoring.fusion, "rrf_k": cfg.scoring.rrf_k}}
    key = hashlib.sha256(json.dumps(fused_provenance, sort_keys=True).encode()).hexdigest()[:16]
    fused_provenance["scores_key"] = key
    topk = cfg.scoring.teacher_cache_topk
    cache_dir = str(paths.teacher_cache_dir) if topk else None

    samples = sorted(table_to_samples(read_table(paths.locate(data.train_path))), key=lambda s: s.sample_id)
    size = cfg.scoring.shard_size
    shards = [samples[i:i + size] for i in range(0, len(samples), size)]
    cache_prov = cache_provenance(cfg, data, cache_temperatures(cfg, paths, len(shards))) if topk else {}
    scores_fresh = all(check_provenance(paths.score_shard(i), fused_provenance) for i in range(len(shards)))
    jobs = []
    for i, shard in enumerate(shards):
        need_measures = not scores_fresh and not check_provenance(paths.measures_shard(i), provenance)
        need_cache = bool(topk) and not check_provenance(paths.teacher_cache_shard(i), cache_prov)
        if need_measures or need_cache:
            jobs.append(ShardJob(i, shard, need_measures, need_cache, len(shards)))
    if jobs:
        check_before_scoring(cfg, jobs, cache_prov.get("temperatures", []), shards)
        log.info("scoring %d of %d shards with %s (%d worker(s))", len(jobs), len(shards), _scorer(cfg)[0],
                 cfg.scoring.num_workers)
        run = _run_in_process if cfg.scoring.num_workers == 1 else _run_on_ray
        run(cfg.with_absolute_paths(), jobs, provenance, cache_prov, for_workers(paths.root))
    if scores_fresh:
        log.info("reusing %d finished score shards in %s", len(shards), paths.scores_dir)
        return ScoresResult(str(paths.scores_dir), len(shards), key, cache_dir)

    m_schema = measures_schema(cfg.scoring.measures)
    tables = []
    for i, shard in enumerate(shards):
        table = read_table_checked(paths.measures_shard(i), m_schema)
        if table.column("sample_id").to_pylist() != [s.sample_id for s in shard]:
            raise ValueError(f"{paths.measures_shard(i)}: its sample ids are not shard {i}'s samples; delete it "
                             f"to recompute it")
        tables.append(table)
    table = pa.concat_tables(tables)
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
    return ScoresResult(str(paths.scores_dir), len(shards), key, cache_dir)


def check_before_scoring(cfg: PoclConfig, jobs: Sequence[ShardJob], temperatures: Sequence[float] = (),
                         shards: Sequence[Sequence[Sample]] = ()) -> None:
    """ConfigErrors found from the tokenizers, model configs and token counts alone, before the model pass
    spends its time: a teacher that does not share the run's tokenizer (training would refuse it after
    scoring), and a shard whose teacher cache would exceed ``CACHE_SHARD_VALUES`` (found mid-pass, the
    shards already written would go stale when shard_size is lowered); ``temperatures``: those whose
    tail log-sum-exps the cache stores; ``shards``: every shard of the run (id order), for the sizes
    the error advises (default: the jobs' own)."""
    tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
    try:
        check_vocab_compatible(load_tokenizer(cfg.models.teacher, cfg.models.trust_remote_code), tokenizer,
                               config_vocab_size(cfg.models.teacher, cfg.models.trust_remote_code),
                               config_vocab_size(cfg.models.student, cfg.models.trust_remote_code))
    except ValueError as exc:
        raise ConfigError(f"models.teacher {cfg.models.teacher} / models.student {cfg.models.student}: {exc}") from None
    topk = cfg.scoring.teacher_cache_topk
    per_position = max(topk, len(temperatures))

    def response_positions(samples: Sequence[Sample]) -> list[int]:
        return [encode_sample(tokenizer, s, cfg.data.prompt_template, cfg.data.max_prompt_length,
                              cfg.data.max_length).n_response for s in samples]

    for job in (j for j in jobs if topk and j.cache):
        positions = sum(response_positions(job.samples))
        if positions * per_position >= CACHE_SHARD_VALUES:
            every = [response_positions(shard) for shard in (shards or [j.samples for j in jobs])]
            raise ConfigError(
                f"scoring.teacher_cache_topk={topk}: shard {job.index}'s teacher cache would hold {positions} response "
                f"positions × {per_position} values, over the {CACHE_SHARD_VALUES} a Parquet shard holds: "
                + cache_fit_advice(cfg, every, len(temperatures)))


def cache_fit_advice(cfg: PoclConfig, positions: Sequence[Sequence[int]], n_temperatures: int) -> str:
    """What makes every teacher-cache shard fit, computed from each shard's response ``positions`` per
    sample: the largest teacher_cache_topk at this shard_size, and the largest shard_size at this topk
    (another shard_size makes the run folder's written score shards stale: that one needs a new run_name)."""
    size, topk = cfg.scoring.shard_size, cfg.scoring.teacher_cache_topk
    widest = max((sum(p) for p in positions), default=0)
    fit_topk = (CACHE_SHARD_VALUES - 1) // max(widest, 1)
    ways = []
    if fit_topk >= max(1, n_temperatures):
        ways.append(f"lower scoring.teacher_cache_topk to at most {fit_topk}")
    fit_size = largest_fitting_shard_size([n for p in positions for n in p], max(topk, n_temperatures), size,
                                          CACHE_SHARD_VALUES)
    if fit_size:
        paths = RunPaths.of(cfg.run_dir, cfg.storage)
        written = sum(paths.measures_shard(i).exists() or paths.score_shard(i).exists()
                      or paths.teacher_cache_shard(i).exists() for i in range(len(positions)))
        ways.append(f"set scoring.shard_size to at most {fit_size} (now {size})" + (
            f" with a new run_name: this run folder's {written} shard(s) were scored with shard_size={size}, and "
            "another shard_size makes them stale" if written else ""))
    if not ways:
        return "one sample alone is over the limit: lower data.max_length or scoring.teacher_cache_topk"
    return " or ".join(ways)


def load_scorer(cfg: PoclConfig) -> tuple[ScoringContext, int]:
    """The scoring model in eval mode on its device, as a ScoringContext, and the vocabulary width.

    The width (logit columns kept in the teacher cache) is the tokenizer's size, capped by the model's.
    """
    path, dtype = _scorer(cfg)
    device = resolve_device(cfg.ray.use_gpu)
    model = decode_only_as_configured(load_causal_lm(path, dtype, cfg.models.trust_remote_code, device).eval())
    tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
    for name in cfg.scoring.measures:
        get_measure(name)  # unknown names fail before any compute
    width = logit_columns(model, tokenizer)
    if cfg.scoring.teacher_cache_topk > width:
        raise ConfigError(f"scoring.teacher_cache_topk={cfg.scoring.teacher_cache_topk} is more than the "
                          f"{width} vocabulary columns of {path}: use at most {width}")
    return ScoringContext(model, tokenizer, pad_id_of(tokenizer), device, cfg.scoring.generation,
                          vocab_columns=width), width


def score_shard(cfg: PoclConfig, ctx: ScoringContext, vocab_columns: int, job: ShardJob, provenance: dict,
                cache_prov: dict, run_dir: str | Location) -> dict[str, float]:
    """Score one shard and write its missing files atomically; returns {"tokens", "seconds"}.

    ``run_dir``: a local path, or the run folder's ObjectPath (it carries the filesystem to Ray tasks).
    """
    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    encoded = [encode_sample(ctx.tokenizer, s, cfg.data.prompt_template, cfg.data.max_prompt_length,
                             cfg.data.max_length) for s in job.samples]
    ctx = replace(ctx, references={s.sample_id: s.response for s in job.samples})
    measures = cfg.scoring.measures if job.measures else []
    topk = cfg.scoring.teacher_cache_topk if job.cache else 0
    temperatures = cache_prov.get("temperatures", [])
    values: dict[str, dict[str, float]] = {m: {} for m in measures}
    cache: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in length_sorted_batches(encoded, cfg.scoring.batch_size):
            result = score_batch(ctx, batch, measures, topk, vocab_columns, temperatures)
            for name in measures:
                for e, value in zip(batch, result.values[name]):
                    if math.isnan(value):  # a finished shard with a NaN would fail every later fusion
                        path, dtype = _scorer(cfg)
                        setting = "models.teacher_dtype" if cfg.scoring.model == "teacher" else "the student's weights"
                        raise ValueError(f"measure '{name}' is NaN for sample '{e.sample_id}' (shard {job.index}, "
                                         f"scoring model {path} in {dtype}); check {setting} and the weights")
                values[name].update(zip((e.sample_id for e in batch), result.values[name]))
            if topk:
                for e, rows in zip(batch, result.cache):
                    if np.isnan(rows[1]).any() or np.isnan(rows[2]).any():  # the loss would drop such rows silently
                        raise ValueError(f"the teacher's logits are NaN for sample '{e.sample_id}' (shard {job.index}); "
                                         f"check models.teacher_dtype ({cfg.models.teacher_dtype}) and the weights")
                cache.update(zip((e.sample_id for e in batch), result.cache))
    ids = [e.sample_id for e in encoded]
    if job.measures:
        columns: dict[str, list] = {"sample_id": ids, "n_prompt_tokens": [e.n_prompt for e in encoded],
                                    "n_response_tokens": [e.n_response for e in encoded]}
        for name in measures:
            columns[name] = [values[name][i] for i in ids]
        write_table_atomic(pa.table(columns), paths.measures_shard(job.index), measures_schema(measures), provenance)
    if topk:
        table = cache_table(ids, [cache[i] for i in ids], topk, len(temperatures))
        write_table_atomic(table, paths.teacher_cache_shard(job.index), teacher_cache_schema(),
                           {**cache_prov, "vocab_columns": vocab_columns, "shard": job.index,
                            "num_shards": job.num_shards})
    return {"tokens": float(sum(len(e.input_ids) for e in encoded)), "seconds": time.perf_counter() - t0}


def _run_in_process(cfg: PoclConfig, jobs: Sequence[ShardJob], provenance: dict, cache_prov: dict,
                    run_dir: str | Location) -> None:
    ctx, width = load_scorer(cfg)
    progress = Progress("score-difficulty", len(jobs), "scoring shards")
    for done, job in enumerate(jobs, start=1):
        stats = score_shard(cfg, ctx, width, job, provenance, cache_prov, run_dir)
        progress.update(done)
        _log_shard(job, stats)


def _score_shard_on_worker(cfg_json: dict, job: ShardJob, provenance: dict, cache_prov: dict,
                           run_dir: str | Location) -> dict[str, float]:
    """Body of one Ray task: load the scorer and score one shard (writes its own files)."""
    cfg = PoclConfig.model_validate(cfg_json)
    ctx, width = load_scorer(cfg)
    return score_shard(cfg, ctx, width, job, provenance, cache_prov, run_dir)


@functools.cache
def _remote_score_shard() -> Any:
    """The shard scorer as a Ray remote function (Ray is imported only when scoring runs on it)."""
    import ray

    return ray.remote(_score_shard_on_worker)


def _run_on_ray(cfg: PoclConfig, jobs: Sequence[ShardJob], provenance: dict, cache_prov: dict,
                run_dir: str | Location) -> None:
    """One Ray task per shard, at most ``scoring.num_workers`` in flight.

    After a failure no new shard starts; the running ones finish (their files are kept for the
    resume) and the first error is raised, naming the shard.
    """
    import ray

    from tasks.distill import check_gpus, ensure_ray, worker_runtime_env  # pulls in Ray Train: import when needed

    ensure_ray(cfg.ray.address)
    check_gpus(cfg, 1, "scoring (one GPU per shard task)")
    options = {"num_cpus": 1, "num_gpus": 1 if cfg.ray.use_gpu else 0, "runtime_env": worker_runtime_env(cfg.ray)}
    cfg_json = cfg.model_dump(mode="json")
    queue = list(jobs)
    pending: dict[Any, ShardJob] = {}
    failures: list[tuple[ShardJob, BaseException]] = []
    progress = Progress("score-difficulty", len(jobs), "scoring shards")
    done = 0
    while queue or pending:
        while queue and not failures and len(pending) < cfg.scoring.num_workers:
            job = queue.pop(0)
            ref = _remote_score_shard().options(**options).remote(cfg_json, job, provenance, cache_prov, run_dir)
            pending[ref] = job
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job = pending.pop(ref)
            try:
                stats = ray.get(ref)
            except Exception as exc:  # a task error or a lost worker: keep draining, then raise
                failures.append((job, exc))
                continue
            done += 1
            progress.update(done)
            _log_shard(job, stats)
    if failures:
        job, exc = failures[0]
        raise RuntimeError(f"scoring shard {job.index} failed on Ray ({len(failures)} shard(s) failed); finished "
                           f"shards are kept, rerun to resume: {exc}") from exc


def _log_shard(job: ShardJob, stats: dict[str, float]) -> None:
    task_logger().info("shard %d: %d samples, %.0f tokens/s", job.index, len(job.samples),
                       stats["tokens"] / max(stats["seconds"], 1e-9))
