"""The deployments against a real Prefect server: a run started through the API completes with its
artifacts, and a run that fails mid-training, retried through the API as the UI's Retry does, resumes.

One ``prefect server start`` (127.0.0.1, free port, own PREFECT_HOME) and one
``python deployments/serve.py quickstart`` serve both tests; runs pass the tiny config and models as
parameters (a Custom run in the UI). The serve process carries ``POCL_FAULT_INJECT`` with a marker
file: the fault is disarmed while the marker exists, and fires once after a test deletes it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest

from deployments.specs import spec_named
from devtools.live_prefect import (PREFECT_CLI, Service, api_healthy, flow_run_logs, start_service, stop_service,
                                   wait_for_final_state, wait_until)
from devtools.processes import free_port
from pocl_core.contracts import RunPaths
from tasks.run_checkpoints import list_checkpoints
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.slow

DEPLOYMENT = spec_named("quickstart")
SERVER_START_S = 120  # a cold `prefect server start` takes ~30 s on a busy 2-core machine
SERVE_START_S = 180
RUN_TIMEOUT_S = 480
# 64 samples, 2 stages (4 + 8 steps of 8 samples), a checkpoint every 3 steps, one Ray worker.
STAGE0_STEPS, TOTAL_STEPS = 4, 12
FAULT_STEP = 8  # mid stage 1: after the stage-0 boundary (step 4) and the checkpoint at step 7
RECIPE = ["data.max_train_samples=64", "data.max_eval_samples=8", "curriculum.num_stages=2",
          "optim.global_batch_size=8", "optim.micro_batch_size=8", "train.checkpoint_every_steps=3",
          "train.log_every_steps=1", "ray.num_workers=1", "eval.max_new_tokens=8"]


def api_client(api_url: str):
    """A synchronous Prefect client of the server at ``api_url`` (use it as a context manager)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


@dataclass
class LiveDeployment:
    """The running server and serve process, the deployment's id, and the knobs the tests use."""

    api_url: str
    deployment_id: Any
    services: tuple[Service, ...]
    runs_root: Path
    fault_marker: Path
    base_overrides: list[str]

    def client(self):
        return api_client(self.api_url)

    def parameters(self, run_name: str) -> dict[str, Any]:
        """The Custom-run parameters: the tiny config and models, a temporary runs_root, a fresh local Ray."""
        return {"config_path": "configs/tiny.yaml", "overrides": [*self.base_overrides, *RECIPE],
                "run_name": run_name, "ray_address": "local", "resume": True}


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS", "POCL_"))}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _read_deployment(client, name: str):
    """The deployment called ``name``, or None while it is not registered."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDeployment]:
    """A Prefect server and ``deployments/serve.py quickstart`` pointed at it; both stopped by PID at the end."""
    root = tmp_path_factory.mktemp("live-prefect")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    marker = root / "fault-fired"
    marker.write_text("disarmed")
    fault = {"at_global_step": FAULT_STEP, "marker": str(marker), "kind": "raise"}
    services: list[Service] = []
    try:
        server_env = {**_base_env(root / "prefect-home"), "PREFECT_UI_ENABLED": "false"}
        services.append(start_service("prefect server", [str(PREFECT_CLI), "server", "start", "--host", "127.0.0.1",
                                                         "--port", str(port)], server_env, root / "server.log"))
        wait_until(f"the Prefect server at {api_url}", lambda: api_healthy(api_url), SERVER_START_S, tuple(services))

        serve_env = {**_base_env(root / "prefect-home"), "PREFECT_API_URL": api_url,
                     "PREFECT_RUNNER_POLL_FREQUENCY": "1", "POCL_FAULT_INJECT": json.dumps(fault)}
        services.append(start_service("serve.py", [sys.executable, "deployments/serve.py", DEPLOYMENT.name],
                                      serve_env, root / "serve.log"))
        with api_client(api_url) as client:
            deployment = wait_until(f"deployment {DEPLOYMENT.full_name} registered by serve.py",
                                    lambda: _read_deployment(client, DEPLOYMENT.full_name), SERVE_START_S,
                                    tuple(services))
        yield LiveDeployment(api_url, deployment.id, tuple(services), root / "runs", marker,
                             [f"models.teacher={tiny_models.teacher}", f"models.student={tiny_models.student}",
                              f"data.train_path={TINY_DATA}", f"runs_root={root / 'runs'}"])
    finally:
        for service in reversed(services):
            stop_service(service)


def _run_through_api(live: LiveDeployment, client, run_name: str):
    """Start a flow run of the deployment as the UI's Custom run does (POST .../create_flow_run)."""
    return client.create_flow_run_from_deployment(live.deployment_id, parameters=live.parameters(run_name))


def _mtimes(paths: list[Path]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def _positions(run_dir: Path) -> dict[str, dict]:
    return {c.name: json.loads((c / "position.json").read_text()) for c in list_checkpoints(run_dir)}


def _metric_rows(paths: RunPaths) -> list[dict]:
    return [json.loads(line) for line in (paths.train_storage / "metrics.jsonl").read_text().splitlines() if line]


def test_deployment_run_started_through_the_api_completes_with_artifacts(live: LiveDeployment):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    live.fault_marker.write_text("disarmed")
    with live.client() as client:
        created = _run_through_api(live, client, "api-run")
        run = wait_for_final_state(client, created.id, RUN_TIMEOUT_S, live.services)
        logs = flow_run_logs(client, run.id)
        assert run.state.is_completed(), f"{run.state!r}\n" + "\n".join(logs[-40:])
        assert run.deployment_id == live.deployment_id and run.parameters["run_name"] == "api-run"
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))

    by_key = {a.key: a for a in artifacts if a.key}
    assert {"pocl-report", "pocl-eval", "partition-buckets", "partition-difficulty-plot"} <= set(by_key)
    assert by_key["pocl-report"].type == "markdown" and "final_student" in by_key["pocl-report"].data
    assert "data:image/png;base64," in by_key["pocl-report"].data
    eval_rows = by_key["pocl-eval"].data
    eval_rows = json.loads(eval_rows) if isinstance(eval_rows, str) else eval_rows
    assert {r["model"] for r in eval_rows} == {"teacher", "initial_student", "final_student"}

    paths = RunPaths.of(live.runs_root / "api-run")
    assert (paths.student / "model.safetensors").is_file()
    assert {r["model"] for r in pq.read_table(paths.eval_metrics).to_pylist()} == {r["model"] for r in eval_rows}
    assert "final_student" in paths.report.read_text()
    assert [p["stage"] for p in _positions(paths.root).values() if p["step_in_stage"] == 0] == [1, 2]
    assert live.fault_marker.read_text() == "disarmed"


def test_failed_run_retried_through_the_api_resumes_where_it_failed(live: LiveDeployment):
    from prefect.states import AwaitingRetry

    live.fault_marker.unlink(missing_ok=True)  # arm the fault: it fires once, after FAULT_STEP
    paths = RunPaths.of(live.runs_root / "retried")
    with live.client() as client:
        created = _run_through_api(live, client, "retried")
        failed = wait_for_final_state(client, created.id, RUN_TIMEOUT_S, live.services)
        assert failed.state.is_failed(), f"{failed.state!r}\n" + "\n".join(flow_run_logs(client, failed.id)[-40:])
        assert live.fault_marker.read_text() == str(FAULT_STEP)  # it failed where the fault was injected
        assert not (paths.student / "model.safetensors").exists()

        upstream = [paths.train_data, paths.eval_data, *sorted(paths.scores_dir.rglob("*.parquet")), paths.partition]
        before = _mtimes(upstream)
        positions_before = _positions(paths.root)
        resumed_from = max(p["global_step"] for p in positions_before.values())
        assert STAGE0_STEPS < resumed_from < FAULT_STEP  # training had passed stage 0 and checkpointed inside stage 1
        rows_before = len(_metric_rows(paths))

        # The UI's Retry: force the failed run to Scheduled named "AwaitingRetry"; same run, same parameters.
        client.set_flow_run_state(failed.id, AwaitingRetry(message="Retry from the UI"), force=True)
        run = wait_for_final_state(client, failed.id, RUN_TIMEOUT_S, live.services, not_state=failed.state.id)
        logs = flow_run_logs(client, run.id)
        assert run.state.is_completed(), f"{run.state!r}\n" + "\n".join(logs[-40:])
        assert run.run_count == 2 and run.parameters == failed.parameters

        # Nothing before the failure is redone: loading, scoring and partitioning are reused ...
        assert _mtimes(upstream) == before
        # ... as their tasks log (logs reach the API in batches, so wait for the scoring and partition lines)
        def reused() -> list[str]:
            lines = [m for m in flow_run_logs(client, run.id) if m.startswith("reusing")]
            return lines if sum("score shards" in m or str(paths.partition) in m for m in lines) == 2 else []

        lines = wait_until("the retry's 'reusing' log lines from scoring and partition", reused, 60)
    assert any(str(paths.train_data.parent) in m for m in lines)  # the loaded data too

    # ... and training continues from the newest checkpoint: no new checkpoint or metric row at or
    # before it, so stage 0 (and the part of stage 1 already checkpointed) is not trained again.
    new = [p for name, p in _positions(paths.root).items() if name not in positions_before]
    assert new and min(p["global_step"] for p in new) > resumed_from
    assert [p["stage"] for p in new if p["step_in_stage"] == 0] == [2]
    retried_rows = _metric_rows(paths)[rows_before:]
    assert [r["global_step"] for r in retried_rows] == list(range(resumed_from + 1, TOTAL_STEPS + 1))
    assert all(r["stage"] == 1 for r in retried_rows)
    assert (paths.student / "model.safetensors").is_file() and paths.report.is_file()
