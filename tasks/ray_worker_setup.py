"""Set-up run in every Ray worker process of a run's job (Ray's ``worker_process_setup_hook``).

Kept to the standard library: Ray imports this module in each worker process before it runs
anything, Ray Train's helper actors included.
"""

from __future__ import annotations

import logging

# Ray Train's PlacementGroupCleaner asks Ray's State API (served by the dashboard, which a Ray
# installed without the ``ray[default]`` extras does not run) every second whether the controller is
# alive, and logs a warning each time the API does not answer: one line a second for a whole fit.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_train_helpers() -> None:
    """Keep only the errors of Ray Train's placement-group cleaner (its per-second State API warning)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
