"""`pocl compare` keeps each folder's config.yaml describing what ran (the tasks are stand-ins: no engine)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import yaml

import flows.compare as compare
from pocl_core.config import ConfigError
from pocl_core.contracts import EVAL_METRICS_SCHEMA, StaleOutputError, write_table_atomic
from pocl_core.data import DataError
from tests.conftest import TINY_CONFIG


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Replace the flow's tasks; ``stale`` names the variants whose training is refused as stale."""
    state = SimpleNamespace(stale=set(), config_at_distill={})

    def evaluate(cfg, data, student, models):
        rows = [{"model": m, "rouge_l": 1.0, "rouge_l_std": 0.0, "rouge_l_greedy": None, "nll": 2.0, "stage": None,
                 "num_samples": 1, "num_seeds": 1} for m in models]
        out = tmp_path / "metrics" / f"{cfg.run_name}.parquet"
        return str(write_table_atomic(pa.Table.from_pylist(rows), out, EVAL_METRICS_SCHEMA))

    def distill(cfg, data, partition_path, cache_dir):
        config = Path(cfg.run_dir) / "config.yaml"
        state.config_at_distill[cfg.run_name] = config.is_file()
        if cfg.run_name in state.stale:
            raise StaleOutputError(f"{cfg.run_dir}/train: produced from different inputs")
        return "student"

    monkeypatch.setattr(compare, "check_inputs", lambda cfg: None)  # the stand-ins need no model folders
    monkeypatch.setattr(compare, "load_dataset", lambda cfg: "data")
    monkeypatch.setattr(compare, "score_difficulty", lambda cfg, data: SimpleNamespace(teacher_cache_dir=None))
    monkeypatch.setattr(compare, "partition", lambda cfg, scores: "partition.parquet")
    monkeypatch.setattr(compare, "distill", distill)
    monkeypatch.setattr(compare, "evaluate", evaluate)
    monkeypatch.setattr(compare, "publish_markdown", lambda *a, **k: None)
    monkeypatch.setattr(compare, "publish_table", lambda *a, **k: None)
    return state


def lr_in(folder: Path) -> float:
    return yaml.safe_load((folder / "config.yaml").read_text())["optim"]["lr"]


def test_a_rerun_refused_as_stale_leaves_config_yaml_describing_what_ran(stand_ins, tmp_path):
    def run(lr: float) -> str:
        return compare.pocl_compare.fn(config_path=str(TINY_CONFIG), overrides=[f"runs_root={tmp_path}",
                                       f"optim.lr={lr}"], strategies=["curriculum"], losses=["fkl"], seeds=[10],
                                       compare_name="cmp")

    variant = tmp_path / "cmp" / "curriculum-fkl-s10"
    run(0.001)
    assert stand_ins.config_at_distill == {"curriculum-fkl-s10": True}  # a new folder gets it before training
    assert lr_in(variant) == 0.001 and lr_in(tmp_path / "cmp" / "shared") == 0.001

    stand_ins.stale = {"curriculum-fkl-s10"}
    with pytest.raises(StaleOutputError) as err:
        run(0.5)
    assert lr_in(variant) == 0.001  # the settings that ran, not the refused ones
    assert str(err.value) == (f"{variant}/train: produced from different inputs. Settings that differ from "
                              f"{variant}/config.yaml: optim.lr: 0.001 → 0.5")
    assert err.value.__cause__ is None and err.value.__suppress_context__

    stand_ins.stale = set()
    run(0.5)
    assert lr_in(variant) == 0.5  # replaced once the variant finished


def compare_fn(tmp_path: Path, *overrides: str) -> str:
    return compare.pocl_compare.fn(config_path=str(TINY_CONFIG), overrides=[f"runs_root={tmp_path}", *overrides],
                                   strategies=["curriculum"], losses=["fkl"], seeds=[10], compare_name="cmp")


def test_a_data_error_leaves_no_new_folder_and_is_one_logged_message(stand_ins, monkeypatch, tmp_path, caplog):
    def bad_data(cfg):
        (Path(cfg.run_dir) / "data").mkdir(parents=True)  # what a load may have written before it failed
        raise DataError("data/x.jsonl:3: missing field 'response'")

    monkeypatch.setattr(compare, "load_dataset", bad_data)
    with caplog.at_level(logging.ERROR), pytest.raises(DataError) as err:
        compare_fn(tmp_path)
    assert str(err.value) == "data/x.jsonl:3: missing field 'response'"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [str(err.value)]
    assert not (tmp_path / "cmp").exists()
    # a comparison folder that was there keeps what it held; only the new shared/ goes
    (tmp_path / "cmp" / "curriculum-fkl-s10").mkdir(parents=True)
    with pytest.raises(DataError):
        compare_fn(tmp_path)
    assert [p.name for p in (tmp_path / "cmp").iterdir()] == ["curriculum-fkl-s10"]


def test_a_config_error_in_the_flow_is_one_logged_message(stand_ins, tmp_path, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError, match="curriculum.num_stagez: unknown key") as err:
        compare_fn(tmp_path, "curriculum.num_stagez=3")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [str(err.value)]
    assert not (tmp_path / "cmp").exists()


def test_the_flow_checks_models_and_data_before_any_task(stand_ins, monkeypatch, tmp_path, caplog):
    """Started from a deployment (no CLI pre-check): a missing model folder or a bad data row is one
    logged message before the first task, and no folder is left."""
    from flows.pipeline import check_inputs

    monkeypatch.setattr(compare, "check_inputs", check_inputs)
    monkeypatch.setattr(compare, "load_dataset", lambda cfg: pytest.fail("the load task ran"))
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError) as err:
        compare_fn(tmp_path, f"models.teacher={tmp_path / 'nowhere'}")
    assert str(err.value).startswith(f"models.teacher: folder {tmp_path / 'nowhere'} not found")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [str(err.value)]
    assert not (tmp_path / "cmp").exists()

    monkeypatch.setattr(compare, "check_inputs", lambda cfg: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Say 1.", "response": "1"}\n{"prompt": "Say 2."}\n')
    with pytest.raises(DataError, match=f"{bad}:2: .*response"):
        compare_fn(tmp_path, f"data.train_path={bad}")
    assert not (tmp_path / "cmp").exists()
