"""What a local Ray started by one of our jobs runs with (``ray.init`` without an address).

Ray Train V2 starts a detached placement-group cleaner that asks the State API once a second
whether the training controller is still alive. The State API is served by the dashboard, which
our local jobs do not start (it costs CPU on a 2-core machine), so every poll fails and logs a
warning: hundreds of lines per run that bury the progress lines. Worse, without an address of its
own the State API client looks for *a* cluster on the machine: when another Ray head runs there
(``ray start``, a test's cluster), the cleaner asks that one, does not find its controller, and
removes the running job's placement group (seen once: a study run lost 55 steps and restarted). On
a local cluster the cleaner has nothing to protect (the cluster ends with the driver), so local jobs
point its State API at an address that cannot answer (``.invalid`` never resolves: RFC 6761), where
every poll fails and the cleaner keeps waiting, and raise its logger to ERROR in every worker
process. Local jobs also start their own instance (``address="local"``) instead of joining a head
that happens to run on the machine. Jobs that join a running cluster (``ray job submit``) keep
Ray's defaults: there the dashboard runs and the cleaner works.
"""

from __future__ import annotations

import logging
import os
from typing import Any

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_polling() -> None:
    """Worker set-up hook: no per-second warning when the State API is absent (errors still show)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def init_address() -> str | None:
    """``ray.init``'s address for a job that does not name a cluster: the one RAY_ADDRESS names (a
    job under ``ray job submit`` runs with it set), else ``"local"``: a new instance of the job's
    own, never a ``ray start`` head that happens to run on the machine."""
    return None if os.environ.get("RAY_ADDRESS") else "local"


#: Where the cleaner's State API client goes on a local cluster: a host that never resolves.
NO_STATE_API = "http://no-state-api.invalid:8265"


def local_runtime_env(dashboard: bool | None) -> dict[str, Any] | None:
    """The runtime env for ``ray.init`` of a local cluster; None when the dashboard runs."""
    if dashboard is False:
        return {"worker_process_setup_hook": f"{__name__}.{quiet_state_api_polling.__name__}",
                "env_vars": {"RAY_API_SERVER_ADDRESS": NO_STATE_API}}
    return None
