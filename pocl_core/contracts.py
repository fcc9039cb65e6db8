"""Every file schema of a run folder, and the atomic readers/writers that enforce them.

Run folder layout (``<runs_root>/<run_name>/``)::

    config.yaml                 the resolved config
    flow_run_id                 the Prefect flow run that created the folder (lets a Retry pass resume=false)
    run.lock                    RUN_LOCK_FIELDS (JSON): the live run writing the folder (pocl_core/run_lock.py)
    data/train.parquet          SAMPLES_SCHEMA, the training split after loading
    data/eval.parquet           SAMPLES_SCHEMA, the held-out split
    scores/measures/part-*.parquet  measures_schema: raw per-sample measures (the resume unit)
    scores/part-00000.parquet   scores_schema(measures): fused difficulty and rank, same sharding
    teacher_cache/part-*.parquet  teacher_cache_schema(): optional top-k teacher logits, same sharding
    partition.parquet           PARTITION_SCHEMA: sample -> bucket
    train/distill/checkpoint_*/ Ray Train storage: checkpoints (folder format: pocl_core/checkpoint.py)
    train/metrics.jsonl         TRAIN_METRICS_FIELDS: one JSON row per metrics window, appended by rank 0
    stages/stage_<s>/           student at the end of stage s (save_pretrained), with eval.at_stage_boundaries
    student/                    final student (save_pretrained, safetensors) + tokenizer
    eval/generations.parquet    GENERATIONS_SCHEMA
    eval/metrics.parquet        EVAL_METRICS_SCHEMA
    eval/models/<name>/{generations,metrics}.parquet  the same schemas, one evaluated model each (the resume unit)
    report.md, plots/*.png

The run folder is a local folder or an ``s3://bucket/prefix`` URI: ``RunPaths`` gives its files as
locations (``pathlib.Path`` locally, ``storage.ObjectPath`` in an object store, see
``pocl_core/storage.py``), and every reader and writer here takes either. Writes are atomic: temp file
+ rename on a local disk, a single upload of the finished bytes to an object store.

Provenance metadata (fingerprints, config) is stored in each Parquet file's schema metadata under
``pocl.*`` keys; a task that finds an output whose provenance differs from its inputs refuses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pocl_core import __version__
from pocl_core import storage
from pocl_core.config_sections import StorageConfig
from pocl_core.storage import Location, ObjectPath, location

PathLike = str | os.PathLike | ObjectPath

META_PREFIX = "pocl."

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
    ]
)

PARTITION_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("bucket", pa.int16(), nullable=False),
    ]
)

GENERATIONS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("decoding", pa.string(), nullable=False),  # "sampled" (one pass per seed) or "greedy"
        pa.field("seed", pa.int64(), nullable=False),  # the sampling seed; 0 for greedy
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("generation", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),
        pa.field("rouge_l", pa.float64(), nullable=False),
    ]
)

EVAL_METRICS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("rouge_l", pa.float64(), nullable=False),
        pa.field("rouge_l_std", pa.float64(), nullable=False),
        pa.field("rouge_l_greedy", pa.float64(), nullable=True),  # null when eval.greedy is off
        pa.field("nll", pa.float64(), nullable=False),
        pa.field("stage", pa.int64(), nullable=True),  # for per-stage students: the stage they finished
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("num_seeds", pa.int64(), nullable=False),
    ]
)


def measures_schema(measures: Iterable[str]) -> pa.Schema:
    """Schema of a raw measures shard (scores/measures/part-*.parquet): the resume unit of scoring."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("n_prompt_tokens", pa.int32(), nullable=False),
        pa.field("n_response_tokens", pa.int32(), nullable=False),
    ]
    return pa.schema(fields + [pa.field(m, pa.float64(), nullable=False) for m in measures])


def scores_schema(measures: Iterable[str]) -> pa.Schema:
    """Schema of a scores shard: ids, token counts, one float64 column per measure, difficulty, rank."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("n_prompt_tokens", pa.int32(), nullable=False),
        pa.field("n_response_tokens", pa.int32(), nullable=False),
    ]
    fields += [pa.field(m, pa.float64(), nullable=False) for m in measures]
    fields += [
        pa.field("difficulty", pa.float64(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
    ]
    return pa.schema(fields)


def teacher_cache_schema() -> pa.Schema:
    """Schema of a teacher-cache shard (teacher_cache/part-*.parquet): one row per sample.

    For a sample with ``n_positions`` response positions (the positions whose next token is a
    response token, in sequence order: the rows of ``train_step.ResponseLogitsLM`` for that sample)
    and ``k`` = metadata ``topk``, the list columns hold row-major arrays:

    * ``topk_ids``: int32 ``[n_positions, k]`` vocabulary ids of the teacher's k largest logits;
    * ``topk_logits``: float32 ``[n_positions, k]`` those raw logits (T = 1), descending per row;
    * ``lse``: float32 ``[n_positions]`` log-sum-exp of the full logit row (first
      ``vocab_columns`` columns, see metadata);
    * ``tail_lse``: float32 ``[n_positions, len(temperatures)]`` log-sum-exp of ``logits / T`` over the
      columns outside the top-k, one column per T of metadata ``temperatures`` (the curriculum's),
      so the tempered teacher's tail mass is exact at each of them.
    """
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("n_positions", pa.int32(), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logits", pa.list_(pa.float32()), nullable=False),
            pa.field("lse", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_lse", pa.list_(pa.float32()), nullable=False),
        ]
    )


# One row of train/metrics.jsonl: the means over a window of ``train.log_every_steps`` optimizer steps
# (a stage's last window may be shorter). Losses are token-weighted means over the whole global batch
# (every worker's response tokens), in nats per token.
TRAIN_METRICS_FIELDS: dict[str, str] = {
    "stage": "curriculum stage (0-based)",
    "step_in_stage": "optimizer steps done in the stage at the window's end",
    "global_step": "optimizer steps done in the run at the window's end",
    "temperature": "the stage's KD temperature T",
    "kd_weight": "λ actually used, averaged over the window's steps (on-policy steps use 1)",
    "lr": "learning rate after the window's last step",
    "samples_seen": "training samples consumed so far, all workers",
    "loss": "(1 − λ)·CE + λ·D_T (T² · D_T under loss.temperature_scaling=t_squared)",
    "kd_loss": "the divergence term as it enters the loss (T² included when scaled)",
    "ce_loss": "cross-entropy on the reference response tokens (T = 1), over the window's steps that train on "
               "them (GKD on-policy steps train on the student's own); null when there were none",
    "tokens_per_s": "response tokens of the global batch per second of the loop's own compute",
    "seconds": "the loop's own compute in the window, measured on rank 0 (batching, forward, backward, optimizer)",
    "on_policy_fraction": "share of the window's steps trained on the student's own generations (GKD)",
}

STUDENT_PROVENANCE = "pocl_provenance.json"  # in student/: written (uploaded) last, marks a complete student

RUN_LOCK_FIELDS = {  # run.lock, one JSON object; times are Unix seconds
    "token": "random id of the holding run (tells its own lock from a run that took it over)",
    "host": "host name of the holding process",
    "machine": "boot id and pid namespace of the holding process (pids compare only within one); may be empty",
    "pid": "process id of the holding process on that host",
    "flow_run_id": "the Prefect flow run holding it; null outside one",
    "acquired": "when the holder took the lock",
    "renewed": "when the holder last renewed it (every quarter of its lease)",
    "lease_s": "seconds after `renewed` when the lock is stale",
}


def encode_run_lock(record: dict[str, Any]) -> bytes:
    """run.lock's bytes: ``record`` holds exactly the RUN_LOCK_FIELDS."""
    if set(record) != set(RUN_LOCK_FIELDS):
        raise ValueError(f"a run.lock record has the fields {sorted(RUN_LOCK_FIELDS)}, not {sorted(record)}")
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


def decode_run_lock(data: bytes) -> dict[str, Any] | None:
    """A run.lock record, or None when the bytes are not one (a file cut short or written by hand)."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or set(record) != set(RUN_LOCK_FIELDS):
        return None
    numbers = all(isinstance(record[k], (int, float)) and not isinstance(record[k], bool)
                  for k in ("pid", "acquired", "renewed", "lease_s"))
    texts = all(isinstance(record[k], str) for k in ("token", "host", "machine"))
    run = record["flow_run_id"] is None or isinstance(record["flow_run_id"], str)
    return record if numbers and texts and run else None


@dataclass(frozen=True)
class RunPaths:
    """Named locations of one run folder (see the module docstring).

    ``root`` is a ``pathlib.Path`` for a local run folder and a ``storage.ObjectPath`` (which carries
    its filesystem) for an ``s3://`` one; every property is a location of the same kind.
    """

    root: Location

    @classmethod
    def of(cls, run_dir: PathLike, storage_config: StorageConfig | None = None) -> "RunPaths":
        """The run folder ``run_dir`` (a path, URI or location); ``storage_config`` opens an s3:// URI."""
        return cls(location(run_dir, storage_config))

    def locate(self, path: PathLike) -> Location:
        """A path handed between tasks as a string, as a location on this run folder's filesystem."""
        if isinstance(self.root, ObjectPath) and isinstance(path, str) and storage.is_remote(path):
            scheme, key = storage.split_uri(path)
            return ObjectPath(self.root.fs, key, scheme)
        return location(path)

    @property
    def config(self) -> Location:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Location:
        """The advisory lock of the live run writing the folder (RUN_LOCK_FIELDS; see run_lock.py)."""
        return self.root / "run.lock"

    @property
    def flow_run_id(self) -> Location:
        """The id of the Prefect flow run that created the folder (absent when made outside a flow run)."""
        return self.root / "flow_run_id"

    @property
    def train_data(self) -> Location:
        return self.root / "data" / "train.parquet"

    @property
    def eval_data(self) -> Location:
        return self.root / "data" / "eval.parquet"

    @property
    def scores_dir(self) -> Location:
        return self.root / "scores"

    def score_shard(self, index: int) -> Location:
        return self.scores_dir / f"part-{index:05d}.parquet"

    def measures_shard(self, index: int) -> Location:
        return self.scores_dir / "measures" / f"part-{index:05d}.parquet"

    @property
    def teacher_cache_dir(self) -> Location:
        return self.root / "teacher_cache"

    def teacher_cache_shard(self, index: int) -> Location:
        return self.teacher_cache_dir / f"part-{index:05d}.parquet"

    @property
    def partition(self) -> Location:
        return self.root / "partition.parquet"

    @property
    def train_storage(self) -> Location:
        return self.root / "train"

    @property
    def student(self) -> Location:
        return self.root / "student"

    @property
    def student_provenance(self) -> Location:
        return self.student / STUDENT_PROVENANCE

    @property
    def train_metrics(self) -> Location:
        return self.train_storage / "metrics.jsonl"

    @property
    def stages_dir(self) -> Location:
        return self.root / "stages"

    def stage_student(self, stage: int) -> Location:
        return self.stages_dir / f"stage_{stage}"

    @property
    def eval_dir(self) -> Location:
        return self.root / "eval"

    @property
    def generations(self) -> Location:
        return self.eval_dir / "generations.parquet"

    @property
    def eval_metrics(self) -> Location:
        return self.eval_dir / "metrics.parquet"

    def eval_model_generations(self, name: str) -> Location:
        """One evaluated model's generations (written as soon as that model is done)."""
        return self.eval_dir / "models" / name / "generations.parquet"

    def eval_model_metrics(self, name: str) -> Location:
        """One evaluated model's metrics row (written last for that model: its presence marks it done)."""
        return self.eval_dir / "models" / name / "metrics.parquet"

    @property
    def report(self) -> Location:
        return self.root / "report.md"

    @property
    def plots_dir(self) -> Location:
        return self.root / "plots"


class StaleOutputError(RuntimeError):
    """An existing output was produced from different inputs than the current ones."""


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """JSON-encode provenance values under ``pocl.`` keys, plus the package version."""
    out = {f"{META_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in meta.items()}
    out[f"{META_PREFIX}package_version".encode()] = json.dumps(__version__).encode()
    return out


def decode_metadata(schema_meta: dict[bytes, bytes] | None) -> dict[str, Any]:
    """Inverse of encode_metadata: the ``pocl.*`` entries, JSON-decoded, prefix stripped."""
    out: dict[str, Any] = {}
    for k, v in (schema_meta or {}).items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX):]] = json.loads(v.decode())
    return out


def write_table_atomic(table: pa.Table, path: PathLike, schema: pa.Schema,
                       metadata: dict[str, Any] | None = None) -> Location:
    """Cast ``table`` to ``schema``, attach provenance metadata, and write it atomically.

    Locally via temp file + rename, to an object store as one upload of the finished file: a reader
    never sees a half-written file. Raises ValueError naming the path if columns are missing.
    """
    path = location(path)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: table lacks required columns {missing}")
    table = table.select(schema.names).cast(schema)
    table = table.replace_schema_metadata(encode_metadata(metadata or {}))
    if isinstance(path, ObjectPath):
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        path.write_bytes(buf.getvalue().to_pybytes())
        return path
    with storage.replacing(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_bytes_atomic(path: PathLike, data: bytes) -> Location:
    """Write a file atomically (temp file in the same folder + rename; one upload to an object store)."""
    return storage.write_bytes_atomic(location(path), data)


def write_text_atomic(path: PathLike, text: str) -> Location:
    """Write a UTF-8 text file atomically (see write_bytes_atomic)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_table(path: PathLike | Sequence[Location]) -> pa.Table:
    """Read a Parquet file, or several (a list of locations on one filesystem) as one table.

    Folder names are not data: no Hive partition columns from ``key=value`` folders in the path."""
    if isinstance(path, (list, tuple)):
        paths = [location(p) for p in path]
        if paths and isinstance(paths[0], ObjectPath):
            return pq.read_table([p.key for p in paths], filesystem=paths[0].fs, partitioning=None)
        return pq.read_table([str(p) for p in paths], partitioning=None)
    path = location(path)
    if isinstance(path, ObjectPath):
        return pq.read_table(path.key, filesystem=path.fs)
    return pq.read_table(path)


def read_table_checked(path: PathLike, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file and check it carries every field of ``schema`` with the right type."""
    path = location(path)
    table = read_table(path)
    for field in schema:
        if field.name not in table.column_names:
            raise ValueError(f"{path}: missing column '{field.name}'")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"{path}: column '{field.name}' has type {got}, expected {field.type}")
    return table


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The decoded provenance metadata of a Parquet file (without reading its rows)."""
    path = location(path)
    if isinstance(path, ObjectPath):
        return decode_metadata(pq.read_schema(path.key, filesystem=path.fs).metadata)
    return decode_metadata(pq.read_schema(path).metadata)


def dotted_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += dotted_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def check_provenance(path: PathLike, expected: dict[str, Any]) -> bool:
    """True if ``path`` exists and every ``expected`` key matches its metadata.

    Returns False when the file is absent. Raises StaleOutputError, naming the differing keys, when
    the file exists but was produced from other inputs.
    """
    path = location(path)
    if not path.exists():
        return False
    meta = read_metadata(path)
    found = {k: meta.get(k) for k in expected}
    diff = dotted_differences(found, json.loads(json.dumps(expected)))
    if diff:
        details = ", ".join(f"{k}: found {a!r}, expected {b!r}" for k, a, b in diff)
        written_by = meta.get("package_version")
        older = "" if written_by == __version__ else (
            f" It was written by pocl-distill {written_by or '(unknown version)'}, this is {__version__}: "
            "provenance records change between versions, so older run folders are not continued.")
        raise StaleOutputError(
            f"{path} was produced from different inputs ({details}).{older} Use a new run_name (or remove "
            f"the whole run folder to start that run over: the run's later outputs were built from this file)"
        )
    return True
