"""The load-dataset task: an empty training or held-out split is a DataError naming the file and the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocl_core.config import load_config
from pocl_core.data import DataError, Sample, split_holdout, stable_sample_id
from tasks.load_data import load_dataset

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def write_samples(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": f"answer {i}"}) + "\n" for i, p in enumerate(prompts)))
    return path


def in_split(prompts: list[str], fraction: float) -> tuple[int, int]:
    """(train, held-out) sizes of the hash split of these prompts (as written by write_samples)."""
    samples = [Sample(stable_sample_id(p, f"answer {i}"), p, f"answer {i}") for i, p in enumerate(prompts)]
    train, held = split_holdout(samples, fraction)
    return len(train), len(held)


def config(tmp_path: Path, *overrides: str, models: tuple[str, str] = ("teacher", "student")):
    teacher, student = models
    return load_config(TINY_CONFIG, [f"models.teacher={teacher}", f"models.student={student}",
                                     f"runs_root={tmp_path / 'runs'}", *overrides])


def test_held_out_split_left_empty_by_the_fraction_names_the_file_and_counts(tmp_path):
    prompts = ["What is 1 plus 1?"]
    assert in_split(prompts, 0.1) == (1, 0)
    data = write_samples(tmp_path / "one.jsonl", prompts)
    with pytest.raises(DataError) as err:
        load_dataset.fn(config(tmp_path, f"data.train_path={data}"))
    assert str(err.value) == (f"{data}: no held-out samples left (1 samples read, 0 of them in the held-out split "
                              "(data.eval_fraction=0.1)); raise data.eval_fraction, or give the held-out samples "
                              "their own file in data.eval_path")


def test_training_split_left_empty_by_the_fraction_names_the_file_and_counts(tmp_path):
    prompts = ["Say 2.", "Say 3."]
    assert in_split(prompts, 0.9) == (0, 2)
    data = write_samples(tmp_path / "two.jsonl", prompts)
    with pytest.raises(DataError) as err:
        load_dataset.fn(config(tmp_path, f"data.train_path={data}", "data.eval_fraction=0.9"))
    msg = str(err.value)
    assert msg.startswith(f"{data}: no training samples left (2 samples read, 0 of them in the training split "
                          "(data.eval_fraction=0.9)); lower data.eval_fraction")


def test_every_prompt_dropped_as_too_long_blames_the_long_prompts_not_the_split(tiny_models, tiny_data_path, tmp_path):
    models = (str(tiny_models.teacher), str(tiny_models.student))
    with pytest.raises(DataError) as err:
        load_dataset.fn(config(tmp_path, f"data.train_path={tiny_data_path}", "data.long_prompts=drop",
                               "data.max_prompt_length=1", models=models))
    msg = str(err.value)
    assert msg.startswith(f"{tiny_data_path}: no training samples left (")
    assert "dropped by data.long_prompts=drop (templated prompt longer than data.max_prompt_length=1 tokens)" in msg
    assert msg.endswith("raise data.max_prompt_length or set data.long_prompts=truncate") and "held-out" not in msg


def test_eval_file_whose_prompts_are_all_too_long_is_named_without_asking_for_an_eval_path(tiny_models, tmp_path):
    train = write_samples(tmp_path / "train.jsonl", ["Say yes.", "Say no.", "Say maybe."])
    held = write_samples(tmp_path / "eval.jsonl", [" ".join(["word"] * 400), " ".join(["other"] * 400)])
    models = (str(tiny_models.teacher), str(tiny_models.student))
    with pytest.raises(DataError) as err:
        load_dataset.fn(config(tmp_path, f"data.train_path={train}", f"data.eval_path={held}",
                               "data.long_prompts=drop", "data.max_prompt_length=64", models=models))
    assert str(err.value) == (f"{held}: no held-out samples left (2 samples read, 2 of those dropped by "
                              "data.long_prompts=drop (templated prompt longer than data.max_prompt_length=64 "
                              "tokens)); raise data.max_prompt_length or set data.long_prompts=truncate")


def test_the_check_before_a_run_and_the_load_step_read_the_files_once(tmp_path, monkeypatch, caplog):
    """flows.pipeline.check_data, then the load step in the same process: one parse, one drop warning;
    a file changed in between is read again."""
    import pocl_core.data
    import tasks.load_data
    from flows.pipeline import check_data

    reads = []
    real = pocl_core.data.load_samples
    monkeypatch.setattr(pocl_core.data, "load_samples", lambda path, *a: reads.append(path) or real(path, *a))
    data = write_samples(tmp_path / "data.jsonl", [f"Say {i}." for i in range(40)])
    with data.open("a") as fh:
        fh.write("not json\n")
    cfg = config(tmp_path, f"data.train_path={data}", "data.on_bad_rows=drop", "data.eval_fraction=0.25")
    with caplog.at_level("WARNING", logger="pocl"):
        check_data(cfg)
        loaded = load_dataset.fn(cfg)
    assert reads == [str(data)]
    assert [r.getMessage().split(": ", 1)[1][:16] for r in caplog.records if "bad row" in r.getMessage()] == \
        ["dropped 1 bad ro"]
    assert loaded.num_train + loaded.num_eval == 40

    write_samples(data, [f"Say {i}." for i in range(30)])
    again = tasks.load_data.read_splits(cfg)
    assert tasks.load_data.read_splits(cfg) is again
    assert reads == [str(data), str(data)]
    assert len(again.train) + len(again.held) == 30
