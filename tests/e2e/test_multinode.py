"""A real multi-node Ray cluster on this machine (head + two worker nodes, each its own raylet):
a 2-worker TorchTrainer placed one worker per node (STRICT_SPREAD) loses a node mid-run, waits for
a replacement node, resumes from its last checkpoint and ends with exactly the model of an
uninterrupted run on the same cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from toy_shards import write_toy_shards

from gems.config import Config
from tune.config import load_config
from tune.train.trainer import TrainOutcome, run_training
from tune.train.worker_loop import HOLD_AT_STEP_ENV, HOLD_DIR_ENV

pytestmark = pytest.mark.slow

SLOT = "trainer_slot"  # only worker nodes advertise it: the head never hosts a training worker
HOLD_STEP = 5          # after the checkpoint of step 3, before step 5: step 4 is lost and redone


def _worker_node(cluster: Cluster):
    # 2 CPUs: one for the training worker, one for the Ray Data reads it starts
    return cluster.add_node(num_cpus=2, resources={SLOT: 1})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    hold_dir = tmp_path_factory.mktemp("hold")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [_worker_node(cluster), _worker_node(cluster)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield cluster, nodes, hold_dir
    ray.shutdown()
    cluster.shutdown()


def _cfg(workdir: Path) -> Config:
    return load_config("tiny", ["train.loss=vocab", f"state_dir={workdir}", "train.num_workers=2",
                                "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD",
                                f"train.worker_resources={{{SLOT}: 1}}", "train.max_steps=6",
                                "train.checkpoint_every=3", "train.report_every=3", "train.batch_size=6",
                                "train.warmup_steps=1", "train.lr=0.01", "train.max_failures=1",
                                "train.precision=fp32", "train.speed_probes=false", "gems.k=0",
                                "gems.t_svd=2", "eval.max_examples=8"])


def test_losing_a_node_resumes_on_a_replacement_and_matches(cluster, tmp_path: Path) -> None:
    cl, nodes, hold_dir = cluster
    shards = write_toy_shards(tmp_path)
    plain = run_training(_cfg(tmp_path), shards, run_name="uninterrupted")
    assert plain.metrics["train/replicas_identical"] == 1.0

    # the same run, except that both ranks hold before step 5 until one worker node is gone
    env = {"OMP_NUM_THREADS": "1", HOLD_DIR_ENV: str(hold_dir), HOLD_AT_STEP_ENV: str(HOLD_STEP)}
    ray.shutdown()  # the driver reconnects with the hook switched on; the cluster stays up
    ray.init(address=cl.address, log_to_driver=False, runtime_env={"env_vars": env})
    outcome: dict[str, TrainOutcome | BaseException] = {}

    def fit() -> None:
        try:
            outcome["run"] = run_training(_cfg(tmp_path), shards, run_name="node-lost")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["run"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    markers = [hold_dir / f"hold-rank{r}" for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers):
        assert thread.is_alive() and time.monotonic() < deadline, f"ranks never held: {outcome}"
        time.sleep(0.5)
    held_on = {m.read_text().strip() for m in markers}
    assert held_on == {n.node_id for n in nodes}  # one worker per worker node (STRICT_SPREAD)
    cl.remove_node(nodes[0])  # its raylet and the training worker on it die
    replacement = _worker_node(cl)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the node was replaced"
    run = outcome["run"]
    assert isinstance(run, TrainOutcome), f"the run failed: {run!r}"
    assert [h["step"] for h in run.history] == [3, 6]  # step 3 checkpoint kept, nothing repeated twice
    assert run.metrics["train/replicas_identical"] == 1.0
    assert run.parameter_digest == plain.parameter_digest  # nothing lost, nothing trained twice
    assert replacement.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
