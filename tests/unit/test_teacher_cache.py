"""The teacher cache: top-k rows, the Parquet round trip, per-batch SparseTeacher assembly, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocl_core.contracts import StaleOutputError, teacher_cache_schema, write_table_atomic
from pocl_core.losses import SparseTeacher, kd_divergence
from pocl_core.teacher_cache import TeacherCache, cache_table, topk_rows


def test_topk_rows_values_dtypes_and_lse():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 1.5, 4.0, -2.0]], dtype=torch.bfloat16)
    ids, top, lse = topk_rows(logits, 2)
    assert ids.dtype == torch.int32 and top.dtype == torch.float32 and lse.dtype == torch.float32
    assert ids.tolist() == [[1, 3], [2, 1]]
    assert top.tolist() == [[3.0, 2.0], [4.0, 1.5]]
    expected = [float(np.log(np.exp([0.5, 3.0, -1.0, 2.0]).sum())), float(np.log(np.exp([1.0, 1.5, 4.0, -2.0]).sum()))]
    np.testing.assert_allclose(lse.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk_rows(logits, 5)
    with pytest.raises(ValueError, match=r"must be \[N, V\]"):
        topk_rows(logits[0], 1)


def _random_entries(rng: np.random.Generator, ids: list[str], k: int, vocab: int = 32):
    entries = {}
    for sid in ids:
        n = int(rng.integers(1, 6))
        logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(np.float32))
        entries[sid] = (logits, tuple(t.numpy() for t in topk_rows(logits, k)))
    return entries


def _write_shards(folder, entries, k, per_shard, meta=None):
    ids = list(entries)
    for s, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start:start + per_shard]
        table = cache_table(chunk, [entries[i][1] for i in chunk], k)
        write_table_atomic(table, folder / f"part-{s:05d}.parquet", teacher_cache_schema(),
                           {"topk": k, "vocab_columns": 32, **(meta or {})})


def test_round_trip_and_sparse_for_concatenates_rows_in_the_given_order(tmp_path):
    rng = np.random.default_rng(0)
    k = 4
    entries = _random_entries(rng, [f"id{i}" for i in range(7)], k)
    _write_shards(tmp_path, entries, k, per_shard=3)
    cache = TeacherCache.load(tmp_path)
    assert len(cache) == 7 and cache.k == 4 and "id3" in cache and "nope" not in cache
    assert cache.metadata["vocab_columns"] == 32
    for sid, (_, (ids, top, lse)) in entries.items():
        got = cache.entry(sid)
        assert np.array_equal(got[0], ids) and np.array_equal(got[1], top) and np.array_equal(got[2], lse)

    order = ["id5", "id0", "id3"]
    sparse = cache.sparse_for(order, "cpu", n_positions=[len(entries[i][1][2]) for i in order])
    assert isinstance(sparse, SparseTeacher)
    dense = torch.cat([entries[i][0] for i in order])
    reference = SparseTeacher.from_logits(dense, k)
    assert sparse.topk_ids.dtype == torch.int64 and sparse.topk_ids.shape == (dense.shape[0], k)
    assert torch.equal(sparse.topk_ids, reference.topk_ids)
    assert torch.equal(sparse.topk_logits, reference.topk_logits)
    torch.testing.assert_close(sparse.lse, reference.lse, rtol=0, atol=0)
    # usable by the sparse KD path as is
    student = torch.randn(dense.shape[0], 32)
    mask = torch.ones(dense.shape[0], dtype=torch.bool)
    torch.testing.assert_close(kd_divergence("fkl", student, sparse, mask), kd_divergence("fkl", student, reference, mask))


def test_sparse_for_errors_name_the_sample(tmp_path):
    entries = _random_entries(np.random.default_rng(1), ["a", "b"], 2)
    _write_shards(tmp_path, entries, 2, per_shard=2)
    cache = TeacherCache.load(tmp_path)
    with pytest.raises(KeyError, match="sample 'zz' is not in the teacher cache"):
        cache.sparse_for(["a", "zz"])
    n_a = len(entries["a"][1][2])
    with pytest.raises(ValueError, match=f"sample 'a' has {n_a} cached positions but the batch has {n_a + 1}"):
        cache.sparse_for(["a"], n_positions=[n_a + 1])
    empty = cache.sparse_for([])
    assert empty.topk_ids.shape == (0, 2) and empty.lse.shape == (0,)


def test_load_refuses_duplicates_mixed_k_stale_and_missing(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(FileNotFoundError, match="no teacher-cache shards"):
        TeacherCache.load(tmp_path)
    entries = _random_entries(rng, ["a", "b"], 2)
    _write_shards(tmp_path, entries, 2, per_shard=2, meta={"scorer_fingerprint": "abc"})
    with pytest.raises(StaleOutputError, match=r"part-00000.parquet.*scorer_fingerprint"):
        TeacherCache.load(tmp_path, expected={"scorer_fingerprint": "xyz"})
    assert len(TeacherCache.load(tmp_path, expected={"scorer_fingerprint": "abc"})) == 2

    dup = tmp_path / "dup"
    dup.mkdir()
    table = cache_table(["a"], [entries["a"][1]], 2)
    for s in range(2):
        write_table_atomic(table, dup / f"part-{s:05d}.parquet", teacher_cache_schema(), {"topk": 2})
    with pytest.raises(ValueError, match=r"part-00001.parquet: row 0: sample 'a' is also cached in .*part-00000"):
        TeacherCache.load(dup)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_table_atomic(table, mixed / "part-00000.parquet", teacher_cache_schema(), {"topk": 2})
    other = _random_entries(rng, ["c"], 3)
    write_table_atomic(cache_table(["c"], [other["c"][1]], 3), mixed / "part-00001.parquet", teacher_cache_schema(),
                       {"topk": 3})
    with pytest.raises(ValueError, match="topk=3 but"):
        TeacherCache.load(mixed)


def test_cache_table_rejects_bad_shapes():
    ids = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="sample 'x'"):
        cache_table(["x"], [(ids, np.zeros((2, 2), np.float32), np.zeros(2, np.float32))], 3)
