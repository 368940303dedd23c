"""What a local Ray started by one of our jobs runs with (``ray.init`` without an address).

Ray Train V2 starts a detached placement-group cleaner that asks the State API once a second
whether the training controller is still alive. The State API is served by the dashboard, which
our local jobs do not start (it costs CPU on a 2-core machine), so every poll fails and logs a
warning: hundreds of lines per run that bury the progress lines. On a local cluster the cleaner has
nothing to protect (the cluster ends with the driver), so its logger is raised to ERROR in every
worker process of the job. Jobs that join a running cluster (``ray job submit``) keep Ray's
defaults: there the dashboard runs and the cleaner works.
"""

from __future__ import annotations

import logging
from typing import Any

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_polling() -> None:
    """Worker set-up hook: no per-second warning when the State API is absent (errors still show)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def local_runtime_env(dashboard: bool | None) -> dict[str, Any] | None:
    """The runtime env for ``ray.init`` of a local cluster; None when the dashboard runs."""
    if dashboard is False:
        return {"worker_process_setup_hook": f"{__name__}.{quiet_state_api_polling.__name__}"}
    return None
