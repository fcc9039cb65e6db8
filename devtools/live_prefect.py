"""Helpers for tests against a real Prefect server: start it and ``deployments/serve.py`` as process
groups, wait for them, poll flow runs through the API, and stop every process they started by PID."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from uuid import UUID

from devtools.processes import stop_tree

REPO = Path(__file__).resolve().parents[1]
PREFECT_CLI = Path(sys.executable).with_name("prefect")


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Service:
    """A process started in its own process group, with its output in ``log``."""

    name: str
    proc: subprocess.Popen
    log: Path

    def describe(self) -> str:
        return f"{self.name} (pid {self.proc.pid}, exit code {self.proc.poll()}), last output:\n{tail(self.log)}"


def start_service(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Service:
    """Start ``cmd`` from the repository root in a new session (its own process group)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name, proc, log)


def stop_service(service: Service, grace_s: float = 15.0) -> None:
    """SIGTERM the service's process group, then SIGKILL it and every process it started.

    Flow runs of a served deployment run in their own sessions (and start Ray below them), so the
    process tree is collected first and its members are killed by PID when they outlive the grace.
    """
    stop_tree(service.proc, grace_s)


def wait_until(what: str, ready: Callable[[], Any], timeout_s: float, services: tuple[Service, ...] = (),
               interval_s: float = 1.0) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail naming ``what`` if a service exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        for service in services:
            if service.proc.poll() is not None:
                raise RuntimeError(f"waiting for {what}: {service.describe()}")
        if time.monotonic() > deadline:
            details = "\n".join(s.describe() for s in services)
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s\n{details}")
        time.sleep(interval_s)


def api_healthy(api_url: str) -> bool:
    """True when ``GET <api>/health`` answers ``true``."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return json.loads(response.read()) is True
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return False


def flow_run_logs(client: Any, flow_run_id: UUID) -> list[str]:
    """Every log message of a flow run (its tasks included), oldest first, read through the API."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    messages: list[str] = []
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    while True:
        page = client.read_logs(log_filter=log_filter, limit=200, offset=len(messages), sort=LogSort.TIMESTAMP_ASC)
        messages += [log.message for log in page]
        if len(page) < 200:
            return messages


def wait_for_final_state(client: Any, flow_run_id: UUID, timeout_s: float, services: tuple[Service, ...],
                         not_state: Optional[UUID] = None) -> Any:
    """The flow run once it reaches a final state other than the state ``not_state`` (a retried run's last).

    On a time-out the error carries the run's logs from the API and the services' output.
    """
    def final() -> Optional[Any]:
        run = client.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() and run.state.id != not_state else None

    try:
        return wait_until(f"flow run {flow_run_id} reaching a final state", final, timeout_s, services)
    except (TimeoutError, RuntimeError) as exc:
        logs = "\n".join(flow_run_logs(client, flow_run_id)[-40:])
        raise AssertionError(f"{exc}\nflow run logs:\n{logs}") from None
