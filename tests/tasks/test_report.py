"""The report's reading of train/metrics.jsonl."""

from __future__ import annotations

import json
import logging

from tasks.report import read_train_metrics


def test_metrics_rows_last_per_step_and_damaged_lines_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [{"global_step": 1, "loss": 3.0}, {"global_step": 2, "loss": 2.5}]
    torn = json.dumps({"global_step": 3, "loss": 2.0})[:12]  # a row cut by a kill ...
    resumed = [{"global_step": 2, "loss": 2.4}, {"global_step": 3, "loss": 1.9}]  # ... then the resumed run's rows
    lines = [json.dumps(r) for r in rows] + [torn + json.dumps(resumed[0]), "", json.dumps(resumed[1]), '{"loss": 1}']
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="pocl"):
        got = read_train_metrics(path)
    assert got == [rows[0], rows[1], resumed[1]]  # step 2's glued line is lost, its first row stays
    assert "line 3" in caplog.text and "line 6" in caplog.text and str(path) in caplog.text
    assert read_train_metrics(tmp_path / "absent.jsonl") == []
