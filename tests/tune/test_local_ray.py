"""A local Ray started by our jobs runs the set-up hook in its workers: the placement-group
cleaner's per-second State API warning is silenced there, and nothing else changes."""

from __future__ import annotations

import logging

import pytest
import ray

from tune.local_ray import NO_STATE_API, PLACEMENT_GROUP_CLEANER_LOGGER, local_runtime_env


def test_runtime_env_only_without_a_dashboard() -> None:
    assert local_runtime_env(True) is None and local_runtime_env(None) is None
    assert local_runtime_env(False) == {"worker_process_setup_hook": "tune.local_ray.quiet_state_api_polling",
                                        "env_vars": {"RAY_API_SERVER_ADDRESS": NO_STATE_API}}


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


@pytest.mark.slow
def test_another_ray_head_on_the_machine_is_neither_joined_nor_asked() -> None:
    """With a `ray start`-style head running on the machine, a local job starts its own instance,
    and Train V2's placement-group cleaner in it cannot take the other head's State API for its own:
    asked about an actor of the job, that API answers "no such actor", which the cleaner reads as a
    dead controller and removes the job's placement group. Locally the question fails instead (the
    cleaner then keeps waiting)."""
    from ray.cluster_utils import Cluster
    from ray.util.state.exception import RayStateApiException

    @ray.remote(num_cpus=0)
    class Probe:
        def ask_about_myself(self) -> str:
            from ray.train.v2._internal.state.util import is_actor_alive

            try:
                return f"answered {is_actor_alive(ray.get_runtime_context().get_actor_id(), 5)}"
            except RayStateApiException as err:
                return f"failed: {type(err).__name__}"

    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=local_runtime_env(False))
        try:
            assert ray.get_runtime_context().gcs_address != other.address  # an instance of its own
            answer = ray.get(Probe.remote().ask_about_myself.remote())
        finally:
            ray.shutdown()
    finally:
        other.shutdown()
    assert answer == "failed: ServerUnavailable", answer
