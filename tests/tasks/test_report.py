"""The report's reading of train/metrics.jsonl."""

from __future__ import annotations

import json
import logging

from tasks.report import read_train_metrics


def row(step: int, loss: float, **changes) -> dict:
    return {"global_step": step, "stage": 0, "loss": loss, "kd_loss": loss, "ce_loss": 1.0, "tokens_per_s": 9.0,
            "temperature": 1.0, **changes}


def test_metrics_rows_last_per_step_and_damaged_lines_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [row(1, 3.0), row(2, 2.5)]
    torn = json.dumps(row(3, 2.0))[:12]  # a row cut by a kill ...
    resumed = [row(2, 2.4), row(3, 1.9)]  # ... then the resumed run's rows
    foreign = [{"global_step": 4, "loss": 1.0}, row(5, 1.0, kd_loss=None), row(6, 1.0, stage="0"), [1]]
    lines = [json.dumps(r) for r in rows] + [torn + json.dumps(resumed[0]), "", json.dumps(resumed[1]), '{"loss": 1}']
    lines += [json.dumps(r) for r in foreign]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="pocl"):
        got = read_train_metrics(path)
    assert got == [rows[0], rows[1], resumed[1]]  # step 2's glued line is lost, its first row stays
    assert "line 3" in caplog.text and "line 6" in caplog.text and str(path) in caplog.text
    assert "line 7 of" in caplog.text and "no number for stage, kd_loss, ce_loss, tokens_per_s, temperature" in caplog.text
    assert "line 8 of" in caplog.text and "no number for kd_loss" in caplog.text
    assert "line 9 of" in caplog.text and "line 10 of" in caplog.text
    assert read_train_metrics(tmp_path / "absent.jsonl") == []


def test_a_window_without_reference_steps_has_a_null_ce_loss_and_still_reports(tmp_path):
    from tasks.train_progress import format_row

    on_policy_only = row(1, 2.0, ce_loss=None, kd_weight=1.0, lr=1e-4)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(on_policy_only) + "\n")
    assert read_train_metrics(tmp_path / "metrics.jsonl") == [on_policy_only]
    assert "(KD 2.0000, CE –)" in format_row(on_policy_only, 10)


def test_the_stage_plan_is_what_trains_for_curriculum_and_the_plain_kd_baseline(tmp_path):
    import pyarrow as pa

    from pocl_core.config import load_config
    from pocl_core.contracts import PARTITION_SCHEMA, write_table_atomic
    from tasks.report import render_report
    from tests.conftest import TINY_CONFIG

    n = 100
    path = tmp_path / "partition.parquet"
    write_table_atomic(pa.table({"sample_id": [f"s{i}" for i in range(n)], "rank": list(range(n)),
                                 "bucket": [i * 4 // n for i in range(n)]}), path, PARTITION_SCHEMA, {})

    def plan_rows(*overrides: str) -> list[str]:
        cfg = load_config(TINY_CONFIG, ["curriculum.num_stages=4", "optim.global_batch_size=10",
                                        "optim.micro_batch_size=5", *overrides])
        text = render_report(cfg, [], [], path)
        table = text.split("## Stage plan")[1].split("\n\n")[1].splitlines()
        return table[2:]

    staged = plan_rows("curriculum.epochs_per_stage=2", "curriculum.temperature_start=1", "curriculum.temperature_end=2")
    assert [r.split(" | ")[1:5] for r in staged] == [["0..0", "25", "2", "6"], ["0..1", "50", "2", "10"],
                                                   ["0..2", "75", "2", "16"], ["0..3", "100", "2", "20"]]
    assert staged[0].endswith("| 1.00 | 0.70 |") and staged[-1].endswith("| 2.00 | 1.00 |")
    cfg = load_config(TINY_CONFIG, ["curriculum.strategy=none", "curriculum.num_stages=4"])
    assert ("strategy: `none`, one stage over every bucket with the optimizer steps of 4 stages × 1 epoch(s)"
            in render_report(cfg, [], [], path))
    baseline = plan_rows("curriculum.strategy=none", "curriculum.epochs_per_stage=2")
    assert len(baseline) == 1 and baseline[0].startswith("| 0 | 0..3 | 100 |")  # one stage over all buckets
    assert baseline[0].split(" | ")[4] == "52"  # the curriculum's 52 steps, the same sample budget
    # the evaluation table: a spread over seeds only where there are several
    metrics = [{"model": "teacher", "rouge_l": 30.0, "rouge_l_std": 0.0, "rouge_l_greedy": 31.5, "nll": 1.5,
                "num_seeds": 1},
               {"model": "student", "rouge_l": 20.0, "rouge_l_std": 1.25, "rouge_l_greedy": None, "nll": 2.5,
                "num_seeds": 3}]
    text = render_report(cfg, metrics, [], path)
    assert "| teacher | 30.00 | – | 31.50 | 1.500 |" in text and "| student | 20.00 | 1.25 | – | 2.500 |" in text
