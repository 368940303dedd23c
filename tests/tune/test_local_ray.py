"""A local Ray started by our jobs runs the set-up hook in its workers: the placement-group
cleaner's per-second State API warning is silenced there, and nothing else changes."""

from __future__ import annotations

import logging

import pytest
import ray

from tune.local_ray import PLACEMENT_GROUP_CLEANER_LOGGER, local_runtime_env


def test_runtime_env_only_without_a_dashboard() -> None:
    assert local_runtime_env(True) is None and local_runtime_env(None) is None
    assert local_runtime_env(False) == {"worker_process_setup_hook": "tune.local_ray.quiet_state_api_polling"}


@pytest.mark.slow
def test_workers_of_a_local_ray_run_the_hook() -> None:
    @ray.remote(num_cpus=0)
    def levels() -> tuple[int, int]:
        return (logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
                logging.getLogger("ray.train").getEffectiveLevel())

    ray.init(num_cpus=1, include_dashboard=False, runtime_env=local_runtime_env(False))
    try:
        cleaner, train = ray.get(levels.remote())
    finally:
        ray.shutdown()
    assert cleaner == logging.ERROR
    assert train < logging.ERROR, "only the cleaner's logger is raised"
