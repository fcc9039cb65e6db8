"""The one list of deployments of ``pocl-distill``: names, parameters and schedules.

``deployments/serve.py`` builds its deployments from these specs; ``deployments/prefect.yaml`` spells
the same values out for ``prefect deploy`` (YAML cannot import Python), and ``tests/ops`` checks that
the two agree. Change a deployment here first, then in prefect.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOW_NAME = "pocl-distill"
ENTRYPOINT = "flows/pipeline.py:pocl_distill"
WORK_POOL = "pocl-process"
WORK_QUEUE = "default"
# The process worker's checkout of this repository; the pull step changes into it before each run.
REPO_DIR_ENV = "POCL_REPO_DIR"


@dataclass(frozen=True)
class CronSpec:
    """A cron schedule; shipped inactive (an example to switch on in the UI or here). ``parameters``
    override the deployment's for the runs it creates: ``run_name: <name>-{scheduled}`` gives each
    scheduled run its own folder (see ``flows.pipeline.expand_run_name``); without it every run would
    continue the config's run folder, find it finished and train nothing."""

    cron: str
    timezone: str = "UTC"
    active: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of the flow: its name, default parameters and schedule."""

    name: str
    description: str
    parameters: dict[str, Any]
    schedule: CronSpec
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def full_name(self) -> str:
        """``flow/deployment``, as ``prefect deployment run`` expects it."""
        return f"{FLOW_NAME}/{self.name}"


def _parameters(config_path: str) -> dict[str, Any]:
    """Every flow parameter with its default spelled out, so the UI shows them all."""
    return {"config_path": config_path, "overrides": [], "run_name": None, "ray_address": None, "resume": True}


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="quickstart",
        description="SmolLM2-135M-Instruct -> 4-layer student on WordNet (configs/quickstart.yaml); "
                    "minutes on a 2-core CPU. Needs `pocl prepare-quickstart` once on the worker.",
        parameters=_parameters("configs/quickstart.yaml"),
        schedule=CronSpec(cron="0 3 * * 1", parameters={"run_name": "quickstart-{scheduled}"}),  # Mondays 03:00 UTC
        tags=("pocl", "quickstart", "cpu"),
    ),
    DeploymentSpec(
        name="paper",
        description="The reference recipe (configs/paper.yaml): GPT-2 XL -> GPT-2 on Dolly, 8 GPU workers; "
                    "set ray_address (or RAY_ADDRESS on the worker) to the cluster.",
        parameters=_parameters("configs/paper.yaml"),
        schedule=CronSpec(cron="0 2 1 * *", parameters={"run_name": "paper-{scheduled}"}),  # 1st of the month, 02:00 UTC
        tags=("pocl", "paper", "gpu"),
    ),
)


def spec_named(name: str) -> DeploymentSpec:
    """The spec called ``name``; KeyError lists the known names."""
    for spec in DEPLOYMENTS:
        if spec.name == name:
            return spec
    raise KeyError(f"no deployment named {name!r}; known: {', '.join(s.name for s in DEPLOYMENTS)}")
