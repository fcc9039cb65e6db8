"""The teacher cache: top-k rows, the Parquet round trip, per-batch SparseTeacher assembly, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocl_core.contracts import StaleOutputError, teacher_cache_schema, write_table_atomic
from pocl_core.losses import SparseTeacher, kd_divergence
from pocl_core.teacher_cache import TeacherCache, cache_table, topk_rows


TEMPS = (1.0, 1.5, 2.0)


def test_topk_rows_values_dtypes_lse_and_tails():
    rows = [[0.5, 3.0, -1.0, 2.0], [1.0, 1.5, 4.0, -2.0]]
    logits = torch.tensor(rows, dtype=torch.bfloat16)
    ids, top, lse, tail = topk_rows(logits, 2, (1.0, 2.0))
    assert ids.dtype == torch.int32 and top.dtype == torch.float32 and lse.dtype == torch.float32
    assert tail.dtype == torch.float32 and tail.shape == (2, 2)
    assert ids.tolist() == [[1, 3], [2, 1]]
    assert top.tolist() == [[3.0, 2.0], [4.0, 1.5]]
    expected = [float(np.log(np.exp(r).sum())) for r in rows]
    np.testing.assert_allclose(lse.numpy(), expected, rtol=1e-6)
    rest = [[0.5, -1.0], [1.0, -2.0]]  # the columns outside each row's top-2
    expected_tail = [[float(np.log(np.exp(np.array(r) / t).sum())) for t in (1.0, 2.0)] for r in rest]
    np.testing.assert_allclose(tail.numpy(), expected_tail, rtol=1e-6)
    _, _, _, none = topk_rows(logits, 4, (2.0,))
    assert torch.isneginf(none).all()  # nothing outside a full-vocabulary top-k
    assert topk_rows(logits, 2, ())[3].shape == (2, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk_rows(logits, 5, TEMPS)
    with pytest.raises(ValueError, match=r"must be \[N, V\]"):
        topk_rows(logits[0], 1, TEMPS)


def _random_entries(rng: np.random.Generator, ids: list[str], k: int, vocab: int = 32):
    entries = {}
    for sid in ids:
        n = int(rng.integers(1, 6))
        logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(np.float32))
        entries[sid] = (logits, tuple(t.numpy() for t in topk_rows(logits, k, TEMPS)))
    return entries


def _write_shards(folder, entries, k, per_shard, meta=None):
    ids = list(entries)
    for s, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start:start + per_shard]
        table = cache_table(chunk, [entries[i][1] for i in chunk], k, len(TEMPS))
        write_table_atomic(table, folder / f"part-{s:05d}.parquet", teacher_cache_schema(),
                           {"topk": k, "vocab_columns": 32, "temperatures": list(TEMPS), **(meta or {})})


def test_round_trip_and_sparse_for_concatenates_rows_in_the_given_order(tmp_path):
    rng = np.random.default_rng(0)
    k = 4
    entries = _random_entries(rng, [f"id{i}" for i in range(7)], k)
    _write_shards(tmp_path, entries, k, per_shard=3)
    cache = TeacherCache.load(tmp_path)
    assert len(cache) == 7 and cache.k == 4 and "id3" in cache and "nope" not in cache
    assert cache.metadata["vocab_columns"] == 32
    assert cache.temperatures == TEMPS
    for sid, (_, rows) in entries.items():
        assert all(np.array_equal(got, want) for got, want in zip(cache.entry(sid), rows, strict=True))

    order = ["id5", "id0", "id3"]
    sparse = cache.sparse_for(order, "cpu", n_positions=[len(entries[i][1][2]) for i in order])
    assert isinstance(sparse, SparseTeacher)
    dense = torch.cat([entries[i][0] for i in order])
    reference = SparseTeacher.from_logits(dense, k, TEMPS)
    assert sparse.topk_ids.dtype == torch.int64 and sparse.topk_ids.shape == (dense.shape[0], k)
    assert torch.equal(sparse.topk_ids, reference.topk_ids)
    assert torch.equal(sparse.topk_logits, reference.topk_logits)
    torch.testing.assert_close(sparse.lse, reference.lse, rtol=0, atol=0)
    torch.testing.assert_close(sparse.tail_lse, reference.tail_lse, rtol=0, atol=0)
    assert sparse.temperatures == TEMPS
    # usable by the sparse KD path as is, and equal to the tempered teacher lumped onto k + 1 buckets
    student = torch.randn(dense.shape[0], 32)
    mask = torch.ones(dense.shape[0], dtype=torch.bool)
    for t in TEMPS:
        got = kd_divergence("fkl", student, sparse, mask, t, temperature_scaling="none")
        torch.testing.assert_close(got, kd_divergence("fkl", student, reference, mask, t, temperature_scaling="none"))
        p = torch.softmax(dense.double() / t, -1)
        p_top = p.gather(-1, reference.topk_ids)
        p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q = torch.softmax(student.double() / t, -1)
        q_top = q.gather(-1, reference.topk_ids)
        q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        want = (p_b * (p_b.log() - q_b.log())).sum(-1).mean()
        assert got.item() == pytest.approx(want.item(), rel=1e-4)


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
    table = cache_table(["a"], [entries["a"][1]], 2, len(TEMPS))
    for s in range(2):
        write_table_atomic(table, dup / f"part-{s:05d}.parquet", teacher_cache_schema(),
                           {"topk": 2, "temperatures": list(TEMPS)})
    with pytest.raises(ValueError, match=r"part-00001.parquet: row 0: sample 'a' is also cached in .*part-00000"):
        TeacherCache.load(dup)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_table_atomic(table, mixed / "part-00000.parquet", teacher_cache_schema(),
                       {"topk": 2, "temperatures": list(TEMPS)})
    other = _random_entries(rng, ["c"], 3)
    write_table_atomic(cache_table(["c"], [other["c"][1]], 3, len(TEMPS)), mixed / "part-00001.parquet",
                       teacher_cache_schema(), {"topk": 3, "temperatures": list(TEMPS)})
    with pytest.raises(ValueError, match="topk=3, temperatures=.* but"):
        TeacherCache.load(mixed)

    temps = tmp_path / "temps"
    temps.mkdir()
    write_table_atomic(table, temps / "part-00000.parquet", teacher_cache_schema(), {"topk": 2, "temperatures": [1.0]})
    with pytest.raises(ValueError, match=r"part-00000.parquet: row 0 \(sample 'a'\): n_positions=5, topk=2, 1 temp.*15 tail_lse"):
        TeacherCache.load(temps)


def test_check_temperatures_names_the_missing_ones(tmp_path):
    entries = _random_entries(np.random.default_rng(3), ["a"], 2)
    _write_shards(tmp_path, entries, 2, per_shard=1)
    cache = TeacherCache.load(tmp_path)
    cache.check_temperatures([1.0, 1.5, 2.0, 2.0 + 1e-9])
    with pytest.raises(ValueError, match=r"temperatures 1, 1.5, 2, but training runs at 1.25, 3: rebuild"):
        cache.check_temperatures([1.25, 2.0, 3.0])
    batch = cache.sparse_for(["a"])
    with pytest.raises(ValueError, match="tail mass at temperature 3 is not stored"):
        kd_divergence("fkl", torch.randn(batch.lse.shape[0], 32), batch, torch.ones(batch.lse.shape[0]), 3.0)


def test_cache_table_rejects_bad_shapes():
    ids, tail = np.zeros((2, 3), np.int32), np.zeros((2, 1), np.float32)
    with pytest.raises(ValueError, match="sample 'x'"):
        cache_table(["x"], [(ids, np.zeros((2, 2), np.float32), np.zeros(2, np.float32), tail)], 3, 1)
    with pytest.raises(ValueError, match=r"tail_lse \(2, 1\), expected .* \(2, 2\)"):
        cache_table(["x"], [(ids, np.zeros((2, 3), np.float32), np.zeros(2, np.float32), tail)], 3, 2)


def test_a_shard_over_the_int32_list_offsets_is_refused_naming_the_settings():
    # 2^25 positions × k = 64 values = 2^31: one more than Parquet's int32 list offsets hold. Broadcast
    # views stand in for the rows, so nothing of that size is allocated before the check.
    n, k = 2 ** 25, 64
    row = (np.broadcast_to(np.int32(0), (n, k)), np.broadcast_to(np.float32(0), (n, k)),
           np.broadcast_to(np.float32(0), (n,)), np.broadcast_to(np.float32(0), (n, 2)))
    with pytest.raises(ValueError, match=r"2147483648 values in one shard.*scoring.shard_size or "
                                         r"scoring.teacher_cache_topk"):
        cache_table(["s"], [row], k, 2)
