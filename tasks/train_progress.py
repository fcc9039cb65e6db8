"""Training progress on the driver: follows ``train/metrics.jsonl`` while the Ray Train job runs.

Rank 0 appends one JSON row per metrics window (``train.log_every_steps``) to the run folder; the
distill task cannot see the workers' Python state, so it reads that file every ``interval_s`` seconds
in a background thread and turns each new row into a log line in the task run's logs plus an update
of a Prefect progress artifact (optimizer steps done / steps planned). Rows already in the file when
training starts (a resumed run) are not logged again; the progress starts from their last step.
"""

from __future__ import annotations

import contextvars
import json
import threading
from typing import Any

from pocl_core.storage import Location
from tasks.common import Progress


def format_row(row: dict[str, Any], total_steps: int) -> str:
    """One metrics row as a log line: stage, step, losses, temperature, λ, learning rate, throughput."""
    ce = "–" if row["ce_loss"] is None else f"{row['ce_loss']:.4f}"  # a window of on-policy steps only
    return (f"stage {row['stage']} step {row['global_step']}/{total_steps}: loss {row['loss']:.4f} "
            f"(KD {row['kd_loss']:.4f}, CE {ce}), T {row['temperature']:.2f}, "
            f"λ {row['kd_weight']:.2f}, lr {row['lr']:.2e}, {row['tokens_per_s']:.0f} tokens/s")


class MetricsFollower:
    """Context manager: while open, new rows of ``metrics`` become log lines and progress updates."""

    def __init__(self, metrics: Location, total_steps: int, interval_s: float = 2.0) -> None:
        self.metrics = metrics
        self.total_steps = total_steps
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.progress = Progress("distill", total_steps, "optimizer steps")
        try:
            earlier = self._complete_lines()
            self._seen = len(earlier)
            self.last_step = int(json.loads(earlier[-1])["global_step"]) if earlier else 0
        except (OSError, ValueError, KeyError, TypeError):  # unreadable now: count from zero, log all rows
            self._seen, self.last_step = 0, 0
        if self.last_step:
            self.progress.update(self.last_step, log=False)

    def _complete_lines(self) -> list[str]:
        """The file's complete lines (a row still being appended has no newline yet)."""
        try:
            text = self.metrics.read_text()
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]

    def poll(self) -> list[dict[str, Any]]:
        """Log and publish the rows appended since the last poll; returns them (unreadable rows skipped)."""
        lines = self._complete_lines()
        fresh, self._seen = lines[self._seen:], len(lines)
        rows = []
        for line in fresh:
            try:
                row = json.loads(line)
                message = format_row(row, self.total_steps)
            except (ValueError, KeyError, TypeError) as exc:
                self.progress.logger.warning("training progress: skipping a metrics row of %s: %s", self.metrics, exc)
                continue
            self.progress.logger.info("%s", message)
            rows.append(row)
        if rows:
            self.last_step = rows[-1]["global_step"]
            self.progress.update(self.last_step, log=False)
        return rows

    def _poll_quietly(self) -> None:
        """poll(), but a flaky store never fails training: it is logged and tried again next time."""
        try:
            self.poll()
        except OSError as exc:
            self.progress.logger.warning("training progress: could not read %s: %s", self.metrics, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll_quietly()

    def __enter__(self) -> "MetricsFollower":
        # Prefect's run context lives in context variables: the thread gets a copy, so its log lines
        # and artifact updates belong to this task run.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="pocl-metrics-follower",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll_quietly()  # the rows written since the last poll
