"""Helpers shared by the tasks: a logger that works in and out of a Prefect run, and safe artifacts."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run, else a plain ``pocl`` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pocl")


def _in_run() -> bool:
    try:
        get_run_logger()
        return True
    except MissingContextError:
        return False


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if _in_run():
        create_markdown_artifact(key=key, markdown=markdown, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if _in_run():
        create_table_artifact(key=key, table=rows, description=description)


class Progress:
    """A Prefect progress artifact (0–100) plus log lines; a no-op artifact outside a run."""

    def __init__(self, key: str, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.description = description
        self.logger = task_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description) if _in_run() else None

    def update(self, done: int, log: bool = True) -> None:
        """Set the artifact to ``done`` of ``total``; also log it unless ``log`` is False."""
        pct = 100.0 * min(done, self.total) / self.total
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, progress=pct)
        if log:
            self.logger.info("%s: %d/%d (%.0f%%)", self.description, done, self.total, pct)
