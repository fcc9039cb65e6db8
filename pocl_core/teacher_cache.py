"""The teacher's top-k logits cache: building its rows, and reading it back for the training loop.

The scoring pass (``tasks.score``) runs the teacher once over every training sample. With
``scoring.teacher_cache_topk = k > 0`` it keeps, for every response position of a sample (the
positions whose *next* token is a response token, in sequence order, i.e. the rows that
``train_step.ResponseLogitsLM`` returns for that sample), the k largest raw logits (T = 1), their
token ids, the log-sum-exp of the whole row, and the log-sum-exp of ``l / T`` over the columns outside
the top-k at every temperature the curriculum uses (metadata ``temperatures``), so the tempered
teacher's tail mass is exact at each stage. That is exactly what :class:`pocl_core.losses.SparseTeacher`
needs, so distillation can skip the teacher forward.

Rows are keyed by ``sample_id`` (never by position in an epoch: the curriculum reorders data), and
stored one Parquet row per sample in ``teacher_cache/part-*.parquet`` (schema:
``contracts.teacher_cache_schema``). Logits are cut to the first ``vocab_columns`` columns (the
tokenizer's size, as the dense KD path does) before the top-k and the log-sum-exp.

    cache = TeacherCache.load(run_paths.teacher_cache_dir)
    teacher = cache.sparse_for(batch_sample_ids, device)   # rows in ResponseLogitsLM order
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from pocl_core.contracts import check_provenance, read_metadata, read_table_checked, teacher_cache_schema
from pocl_core.losses import SparseTeacher
from pocl_core.losses.sparse import tail_logsumexp, temperature_covered
from pocl_core.storage import Location, ObjectPath, location

# ids int32 [n, k], logits float32 [n, k], lse float32 [n], tail_lse float32 [n, len(temperatures)]
CacheRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# Parquet list offsets are int32: one cache shard holds fewer than 2^31 values per list column
CACHE_SHARD_VALUES = 2 ** 31


def largest_fitting_shard_size(positions: Sequence[int], per_position: int, below: int,
                               limit: int = CACHE_SHARD_VALUES) -> int:
    """The largest shard size under ``below`` at which, as at every smaller size, every cache shard holds
    fewer than ``limit`` values (so "at most that size" is true advice: shards cut at multiples of a
    smaller size can hold more than at a larger one).

    ``positions``: response positions per sample, in the order scoring cuts shards from (consecutive runs
    of the shard size); ``per_position``: values per position (``max(topk, temperatures)``). 0 when even
    size 1 does not fit (one sample alone is over the limit).
    """
    counts = np.asarray(positions, dtype=np.int64)
    prefix = np.concatenate([[0], np.cumsum(counts)])
    n = len(counts)
    fits = 0
    for size in range(1, max(min(below - 1, n), 0) + 1):
        starts = np.arange(0, n, size)
        ends = np.minimum(starts + size, n)
        if int((prefix[ends] - prefix[starts]).max()) * per_position >= limit:
            break
        fits = size
    return fits


def topk_rows(logits: torch.Tensor, k: int, temperatures: Sequence[float]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache entry of ``N`` logit rows.

    Args:
        logits: ``[N, V]`` raw logits at T = 1 (any float dtype; already cut to the vocabulary width).
        k: columns kept per row, ``1 <= k <= V``. temperatures: the T's of the tail columns.

    Returns:
        ``(ids int32 [N, k], top logits float32 [N, k] in descending order, lse float32 [N],
        tail_lse float32 [N, len(temperatures)])``: ``lse`` is the log-sum-exp of the full row,
        ``tail_lse[:, j]`` that of ``logits / temperatures[j]`` outside the top-k (``-inf`` when k = V),
        both computed in float32. Same device as ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"topk_rows: logits must be [N, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_rows: k must be in [1, {vocab}] (the vocabulary width), got {k}")
    values, ids = torch.topk(logits, k, dim=-1, sorted=True)
    wide = logits.to(torch.float32)
    lse = torch.logsumexp(wide, dim=-1)
    tail = tail_logsumexp(wide, ids, temperatures).to(torch.float32)
    return ids.to(torch.int32), values.to(torch.float32), lse, tail


def cache_table(sample_ids: Sequence[str], rows: Sequence[CacheRows], k: int, n_temperatures: int) -> pa.Table:
    """A teacher-cache shard's table: one row per sample, arrays flattened row-major.

    ``rows[i]`` is ``(ids int32 [n_i, k], logits float32 [n_i, k], lse float32 [n_i],
    tail_lse float32 [n_i, n_temperatures])`` of sample ``sample_ids[i]``.
    """
    if len(sample_ids) != len(rows):
        raise ValueError(f"cache_table: {len(sample_ids)} sample ids but {len(rows)} row groups")
    counts = np.array([len(r[2]) for r in rows], dtype=np.int64)
    for sid, (ids, logits, lse, tail) in zip(sample_ids, rows):
        n = len(lse)
        if ids.shape != (n, k) or logits.shape != (n, k) or tail.shape != (n, n_temperatures):
            raise ValueError(f"cache_table: sample '{sid}' has ids {ids.shape} / logits {logits.shape} / tail_lse "
                             f"{tail.shape}, expected ({n}, {k}) / ({n}, {k}) / ({n}, {n_temperatures})")
    row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    values = int(row_offsets[-1]) * max(k, n_temperatures)
    if values >= CACHE_SHARD_VALUES:
        raise ValueError(f"cache_table: {int(row_offsets[-1])} response positions × {max(k, n_temperatures)} values "
                         f"per position is {values} values in one shard, over the 2^31 a shard holds: lower "
                         "scoring.shard_size or scoring.teacher_cache_topk")
    row_offsets = row_offsets.astype(np.int32)

    def flat(i: int, dtype: Any) -> np.ndarray:
        parts = [np.asarray(r[i], dtype=dtype).reshape(-1) for r in rows]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return pa.table({
        "sample_id": pa.array(list(sample_ids), pa.string()),
        "n_positions": pa.array(counts.astype(np.int32)),
        "topk_ids": pa.ListArray.from_arrays(pa.array(row_offsets * k), pa.array(flat(0, np.int32))),
        "topk_logits": pa.ListArray.from_arrays(pa.array(row_offsets * k), pa.array(flat(1, np.float32))),
        "lse": pa.ListArray.from_arrays(pa.array(row_offsets), pa.array(flat(2, np.float32))),
        "tail_lse": pa.ListArray.from_arrays(pa.array(row_offsets * n_temperatures), pa.array(flat(3, np.float32))),
    })


def cache_shards(folder: str | os.PathLike | ObjectPath) -> list[Location]:
    """The shard files of the cache in ``folder``: ``part-00000 .. part-{n-1}`` where the first shard
    records ``num_shards`` = n (any higher-numbered file is left over from an earlier pass with more
    shards, e.g. before ``data.max_train_samples`` was lowered, and is not part of this cache), else
    every ``part-*.parquet`` (caches written before shards recorded their count). Raises
    FileNotFoundError for a folder without shards or a missing shard, naming it."""
    folder = location(folder)
    shards = sorted(folder.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no teacher-cache shards (part-*.parquet) in {folder}")
    count = read_metadata(shards[0]).get("num_shards")
    if count is None:
        return shards
    wanted = [folder / f"part-{i:05d}.parquet" for i in range(int(count))]
    missing = [p for p in wanted if p not in shards]
    if missing:
        raise FileNotFoundError(f"teacher cache {folder} has {count} shards but {missing[0].name} is missing")
    return wanted


class TeacherCache:
    """All teacher-cache shards of a run, in memory, addressable by sample id.

    Attributes:
        k: columns per position. temperatures: the T's of the tail log-sum-exp columns (metadata
        ``temperatures``). metadata: the provenance of the shards (``topk``, ``temperatures``,
        ``vocab_columns``, the teacher's fingerprint, the dataset fingerprint, tokenization settings).
    """

    def __init__(self, rows: CacheRows, index: dict[str, tuple[int, int]], metadata: dict[str, Any],
                 folder: Location) -> None:
        self._ids, self._logits, self._lse, self._tail = rows
        self._index = index
        self.metadata = metadata
        self.k = int(self._ids.shape[1])
        self.temperatures = tuple(float(t) for t in metadata.get("temperatures", ()))
        self.folder = folder

    @classmethod
    def load(cls, folder: str | os.PathLike | ObjectPath, expected: dict[str, Any] | None = None) -> "TeacherCache":
        """Read the cache's shards in ``folder`` (a local folder or an object-store location; see
        ``cache_shards``).

        ``expected``: provenance keys every shard must carry (e.g. the teacher fingerprint); a
        mismatch raises ``contracts.StaleOutputError`` naming the file and key. Raises
        FileNotFoundError for a folder without shards and ValueError for malformed rows or a sample
        id found twice (naming the files).
        """
        folder = location(folder)
        shards = cache_shards(folder)
        schema = teacher_cache_schema()
        parts: list[CacheRows] = []
        index: dict[str, tuple[int, int]] = {}
        where: dict[str, Location] = {}
        metadata: dict[str, Any] = {}
        k: int | None = None
        temps: list[float] = []
        offset = 0
        for path in shards:
            if expected:
                check_provenance(path, expected)
            meta = read_metadata(path)
            shard_k, shard_temps = int(meta.get("topk", 0)), [float(t) for t in meta.get("temperatures", [])]
            if k is None:
                k, temps, metadata = shard_k, shard_temps, meta
            elif shard_k != k or shard_temps != temps:
                raise ValueError(f"{path}: topk={shard_k}, temperatures={shard_temps} but {shards[0]} has topk={k}, "
                                 f"temperatures={temps}; rebuild the cache")
            table = read_table_checked(path, schema)
            counts = table.column("n_positions").to_numpy().astype(np.int64)
            ids = np.asarray(table.column("topk_ids").combine_chunks().flatten(), dtype=np.int32)
            logits = np.asarray(table.column("topk_logits").combine_chunks().flatten(), dtype=np.float32)
            lse = np.asarray(table.column("lse").combine_chunks().flatten(), dtype=np.float32)
            tail = np.asarray(table.column("tail_lse").combine_chunks().flatten(), dtype=np.float32)
            total = int(counts.sum())
            if ids.size != total * k or logits.size != total * k or lse.size != total or tail.size != total * len(temps):
                _raise_bad_row(path, table, k, len(temps))
            for row, (sid, n) in enumerate(zip(table.column("sample_id").to_pylist(), counts.tolist())):
                if sid in index:
                    raise ValueError(f"{path}: row {row}: sample '{sid}' is also cached in {where[sid]}")
                index[sid] = (offset, n)
                where[sid] = path
                offset += n
            parts.append((ids.reshape(total, k), logits.reshape(total, k), lse, tail.reshape(total, len(temps))))
        rows = tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
        return cls(rows, index, metadata, folder)

    def check_temperatures(self, temperatures: Sequence[float]) -> None:
        """ValueError unless the cache holds the teacher's tail mass at each of ``temperatures``
        (T = 1 and a top-k covering the vocabulary need none)."""
        if self.k >= int(self.metadata.get("vocab_columns", self.k + 1)):
            return
        missing = sorted({float(t) for t in temperatures if not temperature_covered(self.temperatures, float(t))})
        if missing:
            stored = ", ".join(f"{t:g}" for t in self.temperatures) or "none"
            raise ValueError(
                f"teacher cache {self.folder} holds the teacher's tail mass at temperatures {stored}, but training "
                f"runs at {', '.join(f'{t:g}' for t in missing)}: rebuild the cache with this curriculum (the scoring "
                "pass stores every temperature of the curriculum) or set train.use_teacher_cache=false")

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def entry(self, sample_id: str) -> CacheRows:
        """``(ids int32 [n, k], logits float32 [n, k], lse float32 [n], tail_lse float32 [n, n_T])`` of
        one sample (views)."""
        start, n = self._locate(sample_id)
        span = slice(start, start + n)
        return self._ids[span], self._logits[span], self._lse[span], self._tail[span]

    def sparse_for(self, sample_ids: Sequence[str], device: torch.device | str = "cpu",
                   n_positions: Sequence[int] | None = None) -> SparseTeacher:
        """The cached teacher for one micro-batch, rows concatenated sample by sample in the given order.

        Returns ``SparseTeacher(topk_ids int64 [N, k], topk_logits float32 [N, k], lse float32 [N],
        tail_lse float32 [N, n_T], temperatures)`` on ``device``, N = total response positions: the same rows, in the same order, as
        ``ResponseLogitsLM`` gives for a batch of these samples. ``n_positions`` (optional): each
        sample's response-token count as the loop encoded it; a mismatch (other tokenizer or length
        settings) raises ValueError naming the sample.
        """
        if n_positions is not None and len(n_positions) != len(sample_ids):
            raise ValueError(f"sparse_for: {len(sample_ids)} sample ids but {len(n_positions)} position counts")
        spans = []
        for i, sid in enumerate(sample_ids):
            start, n = self._locate(sid)
            if n_positions is not None and int(n_positions[i]) != n:
                raise ValueError(
                    f"teacher cache {self.folder}: sample '{sid}' has {n} cached positions but the batch has "
                    f"{int(n_positions[i])} response tokens (tokenizer or data.max_length changed?); rebuild the cache")
            spans.append(np.arange(start, start + n))
        rows = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        return SparseTeacher(
            topk_ids=torch.from_numpy(self._ids[rows]).to(device=device, dtype=torch.int64),
            topk_logits=torch.from_numpy(self._logits[rows]).to(device),
            lse=torch.from_numpy(self._lse[rows]).to(device),
            tail_lse=torch.from_numpy(self._tail[rows]).to(device) if self.temperatures else None,
            temperatures=self.temperatures,
        )

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(f"sample '{sample_id}' is not in the teacher cache {self.folder} "
                           f"({len(self._index)} samples); was it scored with this dataset?") from None


def _raise_bad_row(path: Location, table: pa.Table, k: int, n_temperatures: int) -> None:
    """Find and report the first row whose list lengths disagree with n_positions, k and the temperatures."""
    cols = table.select(["sample_id", "n_positions", "topk_ids", "topk_logits", "lse", "tail_lse"]).to_pylist()
    for row, rec in enumerate(cols):
        n = rec["n_positions"]
        if (len(rec["topk_ids"]) != n * k or len(rec["topk_logits"]) != n * k or len(rec["lse"]) != n
                or len(rec["tail_lse"]) != n * n_temperatures):
            raise ValueError(
                f"{path}: row {row} (sample '{rec['sample_id']}'): n_positions={n}, topk={k}, {n_temperatures} "
                f"temperature(s) but lists have {len(rec['topk_ids'])} ids, {len(rec['topk_logits'])} logits, "
                f"{len(rec['lse'])} lse and {len(rec['tail_lse'])} tail_lse values")
    raise ValueError(f"{path}: list lengths disagree with n_positions, topk={k} and {n_temperatures} temperature(s)")
