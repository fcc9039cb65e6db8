import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pocl_core.contracts import (PARTITION_SCHEMA, SAMPLES_SCHEMA, StaleOutputError, check_provenance, read_metadata,
                                 read_table_checked, scores_schema, write_table_atomic)


def test_write_casts_to_schema_and_keeps_provenance(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"sample_id": ["a", "b"], "rank": [1, 0], "bucket": [0, 1], "extra": [9, 9]})
    write_table_atomic(table, path, PARTITION_SCHEMA, {"strategy": "curriculum", "num_buckets": 2})
    got = pq.read_table(path)
    assert got.schema.remove_metadata() == PARTITION_SCHEMA
    assert got.schema.field("bucket").type == pa.int16()
    meta = read_metadata(path)
    assert meta["strategy"] == "curriculum" and meta["num_buckets"] == 2 and "package_version" in meta
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]  # no temp files left behind


def test_write_refuses_missing_columns_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="lacks required columns"):
        write_table_atomic(pa.table({"sample_id": ["a"]}), tmp_path / "s.parquet", SAMPLES_SCHEMA)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.parquet"
    good = pa.table({"sample_id": ["a"], "prompt": ["p"], "response": ["r"]})
    write_table_atomic(good, path, SAMPLES_SCHEMA)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        write_table_atomic(good, path, SAMPLES_SCHEMA)
    monkeypatch.undo()
    assert pq.read_table(path).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_scores_schema_has_one_column_per_measure():
    schema = scores_schema(["nll", "rouge_l"])
    assert schema.names == ["sample_id", "n_prompt_tokens", "n_response_tokens", "nll", "rouge_l", "difficulty", "rank"]
    assert schema.field("n_prompt_tokens").type == pa.int32() and schema.field("rank").type == pa.int64()


def test_provenance_check(tmp_path):
    path = tmp_path / "x.parquet"
    assert check_provenance(path, {"a": 1}) is False
    write_table_atomic(pa.table({"sample_id": ["a"], "prompt": ["p"], "response": ["r"]}), path, SAMPLES_SCHEMA,
                       {"a": 1, "b": {"c": [1, 2]}})
    assert check_provenance(path, {"a": 1, "b": {"c": [1, 2]}}) is True
    with pytest.raises(StaleOutputError, match=r"x.parquet.*a: found 1, expected 2\)\. Use a new run_name \(or remove "
                                               r"the whole run folder to start that run over"):
        check_provenance(path, {"a": 2})  # not "delete the file": the run's later outputs came from it


def test_read_checked_reports_wrong_types(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "rank": [0], "bucket": [0]}), path)  # bucket int64
    with pytest.raises(ValueError, match="bucket.*int16"):
        read_table_checked(path, PARTITION_SCHEMA)
    os.remove(path)


def test_stale_outputs_name_nested_keys_and_an_older_writer(tmp_path, monkeypatch):
    import pocl_core.contracts as contracts

    path = tmp_path / "p.parquet"
    table = pa.table({"sample_id": ["a"], "rank": [0], "bucket": [0]})
    write_table_atomic(table, path, PARTITION_SCHEMA, {"source": {"max_length": 64, "template": "t"}, "k": 1})
    assert check_provenance(path, {"source": {"max_length": 64, "template": "t"}, "k": 1})
    with pytest.raises(StaleOutputError) as err:
        check_provenance(path, {"source": {"max_length": 96, "template": "t"}, "k": 1})
    assert "source.max_length: found 64, expected 96" in str(err.value) and "template" not in str(err.value)
    assert "written by" not in str(err.value)  # same version: no word about versions
    monkeypatch.setattr(contracts, "__version__", "9.9.9")
    with pytest.raises(StaleOutputError, match=r"written by pocl-distill \d+\.\d+\.\d+, this is 9\.9\.9"):
        check_provenance(path, {"source": {"max_length": 96, "template": "t"}, "k": 1})


def test_key_value_folders_in_a_path_are_not_read_as_columns(tmp_path):
    """pyarrow reads a list of files as a Hive-partitioned dataset by default: a runs_root such as
    ``rank=x/`` added a column (or clashed with one) when several score shards were read at once."""
    from pocl_core.contracts import read_table

    folder = tmp_path / "lr=0.1" / "rank=x" / "scores"
    folder.mkdir(parents=True)
    paths = []
    for i in range(2):
        paths.append(folder / f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"sample_id": [f"s{i}"], "rank": [i]}), paths[-1])
    both = read_table(paths)
    assert both.schema.names == ["sample_id", "rank"] and both.column("rank").to_pylist() == [0, 1]
    assert read_table(paths[0]).schema.names == ["sample_id", "rank"]
