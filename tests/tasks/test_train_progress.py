"""The distill task's view of training progress: metrics rows become log lines and a progress value."""

from __future__ import annotations

import json
import logging
import time

from tasks.train_progress import MetricsFollower, format_row


def row(step: int, stage: int = 0) -> dict:
    return {"stage": stage, "step_in_stage": step, "global_step": step, "temperature": 1.0, "kd_weight": 0.7,
            "lr": 1e-4, "samples_seen": 8 * step, "loss": 1.0 / step, "kd_loss": 0.5, "ce_loss": 2.0,
            "tokens_per_s": 123.4, "seconds": 0.1, "on_policy_fraction": 0.0}


def append(path, *rows, partial: str = "") -> None:
    with path.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows) + partial)


def test_format_row_names_stage_step_losses_and_schedule():
    line = format_row(row(4, stage=1), total_steps=10)
    assert line == ("stage 1 step 4/10: loss 0.2500 (KD 0.5000, CE 2.0000), T 1.00, λ 0.70, lr 1.00e-04, "
                    "123 tokens/s")


def test_follower_logs_only_new_complete_rows_and_tracks_the_last_step(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    append(metrics, row(1), row(2))  # an earlier attempt's rows (a resumed run): not logged again
    caplog.set_level(logging.INFO, logger="pocl")
    with MetricsFollower(metrics, total_steps=6, interval_s=0.05) as follower:
        assert follower.last_step == 2
        append(metrics, row(3), partial=json.dumps(row(4))[:20])  # row 4 is still being written
        deadline = time.monotonic() + 10
        while follower.last_step != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.last_step == 3
        with metrics.open("a") as fh:  # the rest of row 4, then row 5 after the last poll
            fh.write(json.dumps(row(4))[20:] + "\n" + json.dumps(row(5)) + "\n")
    logged = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == ["stage 0 step 3/6", "stage 0 step 4/6", "stage 0 step 5/6"]
    assert follower.last_step == 5


def test_follower_without_a_metrics_file_yet(tmp_path):
    with MetricsFollower(tmp_path / "absent.jsonl", total_steps=3, interval_s=0.05) as follower:
        time.sleep(0.15)
    assert follower.last_step == 0 and follower.poll() == []


def test_an_unreadable_row_is_skipped_with_a_warning_not_raised(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    caplog.set_level(logging.INFO, logger="pocl")
    follower = MetricsFollower(metrics, total_steps=4, interval_s=60)
    append(metrics, row(1))
    with metrics.open("a") as fh:  # a torn row, then one with fields missing
        fh.write("{not json\n" + json.dumps({"global_step": 2}) + "\n")
    append(metrics, row(3))
    assert [r["global_step"] for r in follower.poll()] == [1, 3]
    assert follower.last_step == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("skipping a metrics row" in w for w in warnings)


def test_a_windows_ce_loss_counts_only_the_steps_on_reference_responses():
    """GKD on-policy steps train on the student's own samples: their CE (weight 0 in the loss) stays out
    of ce_loss, which is null for a window of on-policy steps only; loss and KD keep every step."""
    from types import SimpleNamespace

    import torch

    from tasks.distill_loop import _Window

    def losses(total, kd, ce):
        return SimpleNamespace(total=torch.tensor(total), kd=torch.tensor(kd), ce=torch.tensor(ce))

    window = _Window()
    window.add(losses(1.0, 0.5, 2.0), 0.25)
    window.add(losses(3.0, 1.5, 9.0), 0.75, reference=False)
    row = window.flush(1, torch.device("cpu"))
    assert row["ce_loss"] == 2.0 and row["loss"] == 0.25 * 1.0 + 0.75 * 3.0 and row["kd_loss"] == 0.25 * 0.5 + 0.75 * 1.5
    window.add(losses(3.0, 1.5, 9.0), 1.0, reference=False)
    assert window.flush(1, torch.device("cpu"))["ce_loss"] is None
