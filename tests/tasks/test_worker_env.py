"""ray.worker_niceness reaches the Ray workers of a job (Ray Train's workers are actors)."""

from __future__ import annotations

import os

import pytest

from pocl_core.config import RayConfig
from tasks.distill import worker_runtime_env


def _niceness() -> int:
    return os.nice(0)


@pytest.mark.slow
@pytest.mark.parametrize("niceness", [0, None])
def test_workers_start_with_the_configured_niceness(local_ray, niceness):
    env = worker_runtime_env(RayConfig(worker_niceness=niceness))
    actor = local_ray.remote(type("Probe", (), {"nice": staticmethod(_niceness)}))
    expected = 15 if niceness is None else niceness  # None leaves Ray's own default
    probe = actor.options(num_cpus=0, runtime_env=env).remote()
    assert local_ray.get(probe.nice.remote()) == expected
    local_ray.kill(probe)


def test_niceness_outside_the_unix_range_is_refused():
    with pytest.raises(ValueError, match="worker_niceness"):
        RayConfig(worker_niceness=20)
    with pytest.raises(ValueError, match="worker_niceness"):
        RayConfig(worker_niceness=-1)
