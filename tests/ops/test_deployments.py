"""deployments/: prefect.yaml is well-formed, points at the real flow, and agrees with specs.py/serve.py.

Nothing here starts a server or serves: building RunnerDeployments is offline.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import yaml

from deployments.specs import DEPLOYMENTS, ENTRYPOINT, FLOW_NAME, REPO_DIR_ENV, WORK_POOL, WORK_QUEUE, spec_named

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def entry_flow():
    """The flow object that prefect.yaml's entrypoint names, loaded the way `prefect deploy` does."""
    from prefect.flows import load_flow_from_entrypoint

    cwd = os.getcwd()
    os.chdir(REPO)  # entrypoints are relative to the repository root
    try:
        return load_flow_from_entrypoint(ENTRYPOINT, use_placeholder_flow=False)
    finally:
        os.chdir(cwd)


def test_prefect_yaml_shape(prefect_yaml):
    assert prefect_yaml["name"] == FLOW_NAME
    names = [d["name"] for d in prefect_yaml["deployments"]]
    assert names == [s.name for s in DEPLOYMENTS] and len(set(names)) == len(names)
    (step,) = prefect_yaml["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ ${REPO_DIR_ENV} }}}}"}}


def test_every_entrypoint_is_the_flow(prefect_yaml, entry_flow):
    from prefect import Flow

    for dep in prefect_yaml["deployments"]:
        assert dep["entrypoint"] == ENTRYPOINT
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).is_file()
    assert isinstance(entry_flow, Flow) and entry_flow.name == FLOW_NAME


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=lambda s: s.name)
def test_parameters_fit_the_flow_signature(spec, entry_flow, prefect_yaml):
    dep = next(d for d in prefect_yaml["deployments"] if d["name"] == spec.name)
    params = dep["parameters"]
    sig = inspect.signature(entry_flow.fn)
    sig.bind(**params)  # raises TypeError on an unknown or missing parameter
    assert set(params) == set(sig.parameters), "list every parameter so the UI shows them all"
    entry_flow.validate_parameters(params)  # Prefect's own type check (what enforce_parameter_schema does)
    assert (REPO / params["config_path"]).is_file()


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=lambda s: s.name)
def test_prefect_yaml_agrees_with_specs(spec, prefect_yaml):
    dep = next(d for d in prefect_yaml["deployments"] if d["name"] == spec.name)
    assert dep["parameters"] == spec.parameters
    assert dep["description"] == spec.description
    assert tuple(dep["tags"]) == spec.tags
    (sched,) = dep["schedules"]
    assert sched == {"cron": spec.schedule.cron, "timezone": spec.schedule.timezone, "active": spec.schedule.active,
                     "parameters": spec.schedule.parameters}
    assert "{scheduled}" in sched["parameters"]["run_name"], "each scheduled run needs its own run folder"
    assert sched["active"] is False, "the schedule is an example; it ships switched off"
    assert dep["work_pool"]["name"] == WORK_POOL and dep["work_pool"]["work_queue_name"] == WORK_QUEUE


def test_shipped_configs_with_deployment_parameters_validate():
    from flows.pipeline import resolve_config

    for spec in DEPLOYMENTS:
        p = spec.parameters
        # the parameters form a valid config; the models and data are the serving machine's to provide
        cfg = resolve_config(str(REPO / p["config_path"]), p["overrides"], p["run_name"], p["ray_address"],
                             verify_inputs=False)
        assert cfg.run_name


def test_serve_builds_the_same_deployments():
    from deployments.serve import build_deployments

    cwd = os.getcwd()
    try:
        built = build_deployments()
    finally:
        os.chdir(cwd)
    assert [d.name for d in built] == [s.name for s in DEPLOYMENTS]
    for dep, spec in zip(built, DEPLOYMENTS):
        assert dep.entrypoint == ENTRYPOINT
        assert dep.parameters == spec.parameters
        assert dep.description == spec.description and tuple(dep.tags) == spec.tags
        (sched,) = dep.schedules
        assert sched.active is False
        assert (sched.schedule.cron, sched.schedule.timezone) == (spec.schedule.cron, spec.schedule.timezone)
        assert sched.parameters == spec.schedule.parameters


def test_serve_rejects_unknown_names(capsys):
    from deployments.serve import main

    assert main(["nope"]) == 2
    assert "no deployment named 'nope'" in capsys.readouterr().err
    with pytest.raises(KeyError):
        spec_named("nope")


def test_a_scheduled_run_name_is_its_scheduled_start_so_a_retry_resumes_it(monkeypatch, tmp_path):
    """Prefect sets a flow run's expected start once, at its first state: a Retry keeps it."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    import flows.pipeline as pipeline

    start = datetime(2026, 12, 7, 4, 0, tzinfo=timezone(timedelta(hours=1)))  # 03:00 UTC
    monkeypatch.setattr(pipeline, "flow_run", SimpleNamespace(scheduled_start_time=start, id=None))
    for spec in DEPLOYMENTS:
        p = {**spec.parameters, **spec.schedule.parameters}
        cfg = pipeline.resolve_config(str(REPO / p["config_path"]), [f"runs_root={tmp_path}"], p["run_name"],
                                      p["ray_address"], verify_inputs=False)
        assert cfg.run_name == f"{spec.name}-20261207-0300"
    assert pipeline.expand_run_name("plain") == "plain"
