"""Serve the POCL deployments from this process: ``python deployments/serve.py [NAME ...]``.

The same deployments as ``deployments/prefect.yaml`` (both come from ``deployments/specs.py``), but
without a work pool: this process polls the Prefect API (PREFECT_API_URL, e.g. a
``prefect server start``) and runs each flow run in a subprocess, from the repository root so the
relative config paths resolve. Ctrl-C stops serving and pauses the schedules. Names select a subset
(default: all). See docs/operations.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python deployments/serve.py` puts deployments/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from deployments.specs import DEPLOYMENTS, DeploymentSpec, spec_named  # noqa: E402


def build_deployment(spec: DeploymentSpec):
    """A RunnerDeployment of ``pocl_distill`` for ``spec`` (no API call; ``prefect.serve`` registers it)."""
    from prefect.schedules import Cron

    from flows.pipeline import pocl_distill

    return pocl_distill.to_deployment(
        name=spec.name,
        description=spec.description,
        tags=list(spec.tags),
        parameters=dict(spec.parameters),
        schedules=[Cron(spec.schedule.cron, timezone=spec.schedule.timezone, active=spec.schedule.active,
                        parameters=dict(spec.schedule.parameters))],
    )


def build_deployments(names: Optional[Sequence[str]] = None) -> list:
    """The deployments named (all when none), built from the repository root."""
    specs = [spec_named(n) for n in names] if names else list(DEPLOYMENTS)
    os.chdir(REPO_ROOT)  # entrypoints and config paths are relative to the repository root
    return [build_deployment(s) for s in specs]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the deployments and serve them until interrupted."""
    from prefect import serve

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        deployments = build_deployments(args)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
