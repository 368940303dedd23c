"""Ray Train (V2) TorchTrainer for GEMS fine-tuning: build it from a Config, run it, summarise it.

Tune's trial function and ``pipelines/train.py`` both call :func:`build_trainer` /
:func:`run_training`; the per-worker loop lives in :mod:`tune.train.worker_loop`.

Why the pieces are set up the way they are:

- The prompt tables are small, so they are read on the driver and given whole to
  every worker (``datasets_to_split=[]``): no Ray Data tasks compete with the training workers for
  CPUs mid-run (a deadlock on small machines), and each rank slices the global batch itself, which
  makes the data order independent of block scheduling and exactly resumable.
- The null-space bases are built once (driver side, cached on disk) and shipped by path.
- ``FailureConfig(max_failures)`` restarts the worker group from the latest reported checkpoint;
  ``resume_from`` starts a new run from any checkpoint (``--resume``).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gems.checkpoint import read_trainer_state
from gems.config import Config
from gems.data.shards import read_items, read_split
from gems.tasks import TASKS
from tune.train.item_vectors import collab_vectors_path
from tune.train.worker_loop import TRAIN_COLUMNS, train_loop_per_worker

log = logging.getLogger(__name__)

DATASETS = ("train", "val", "items")


@dataclass(frozen=True)
class TrainOutcome:
    """What a finished training run produced."""

    checkpoint_path: Path | None  # final checkpoint dir (HF model/ + optimizer state), local storage
    metrics: dict[str, Any]  # the last report: train/* window averages, val/* at the end, step
    history: list[dict[str, Any]]  # every report of rank 0, in step order (survives restarts)
    run_path: str  # the run's directory in storage (checkpoints, Ray Train state)
    precision: dict[str, Any] = field(default_factory=dict)  # gems.precision record of the run
    parameter_digest: str = ""  # SHA-256 of the final parameters (rank 0)


def default_run_name(cfg: Config) -> str:
    """A fresh name: Ray Train resumes a run whose name already exists in storage."""
    return f"{cfg.name}-train-{uuid.uuid4().hex[:8]}"


def storage_path(cfg: Config) -> str:
    """cfg.train.storage_path as Ray wants it: URIs as given, local paths absolute."""
    raw = cfg.train.storage_path
    return raw if "://" in raw else str(cfg.resolve(raw))


def shard_datasets(shard_dir: Path) -> dict[str, ray.data.Dataset]:
    """train/val prompt tables and the item table, read on the driver and put in the object store
    (no Ray Data read tasks: on a small machine they would wait for CPUs the workers hold)."""
    train = read_split(shard_dir, "train").select(TRAIN_COLUMNS)
    tasks = set(train["task"].unique().to_list())
    if not set(TASKS) <= tasks:
        raise ValueError(f"train shards in {shard_dir} hold tasks {sorted(tasks)}; GEMS needs both "
                         "search and rec examples")
    frames = {"train": train, "val": read_split(shard_dir, "val"),
              "items": read_items(shard_dir).select(["item_id", "title"])}
    datasets = {name: ray.data.from_arrow(frame.to_arrow()) for name, frame in frames.items()}
    for dataset in datasets.values():
        # A dataset carries the driver's DataContext to the workers: without this its progress bars
        # stay open in the worker and are re-printed before every progress line of the run.
        dataset.context.enable_progress_bars = False
    return datasets


def build_trainer(cfg: Config, shard_dir: Path, bases_path: Path | None, run_name: str,
                  resume_from: Path | None = None) -> TorchTrainer:
    """A TorchTrainer for ``cfg`` over the shards in ``shard_dir`` (call ``.fit()`` to run it)."""
    tc = cfg.train
    if tc.fail_at_step is not None and "://" in tc.storage_path:
        raise ValueError("train.fail_at_step (fault injection) needs a local train.storage_path")
    if resume_from is not None and "://" not in str(resume_from):
        read_trainer_state(Path(resume_from))  # fail now, not inside every worker
    datasets = shard_datasets(shard_dir)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "bases_path": str(bases_path) if bases_path is not None else None,
        "item_vectors_path": _optional_str(collab_vectors_path(cfg, shard_dir)),
        "run_name": run_name,
        # Ray Train V2 dropped resume_from_checkpoint: the loop falls back to this path when the
        # run has no checkpoint of its own yet (a restarted worker group prefers the run's latest).
        "resume_from": str(resume_from) if resume_from is not None else None,
        "fault_marker": (str(Path(storage_path(cfg)) / run_name / f".fault-injected-step-{tc.fail_at_step}")
                         if tc.fail_at_step is not None else None),
    }
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {}), **tc.worker_resources}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=tc.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path(cfg),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _optional_str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def outcome_from_result(result: Result) -> TrainOutcome:
    """Summarise a finished ``trainer.fit()`` (raises the run's error if it failed)."""
    if result.error is not None:
        raise result.error
    returned = result.return_value or {}
    history = list(returned.get("history", []))
    checkpoint = result.checkpoint
    local = Path(checkpoint.path) if checkpoint is not None and "://" not in str(checkpoint.path) else None
    return TrainOutcome(checkpoint_path=local,
                        metrics=dict(history[-1]) if history else dict(result.metrics or {}),
                        history=history, run_path=str(result.path),
                        precision=dict(returned.get("precision", {})),
                        parameter_digest=str(returned.get("parameter_digest", "")))


def run_training(cfg: Config, shard_dir: Path, bases_path: Path | None = None,
                 run_name: str | None = None, resume_from: Path | None = None) -> TrainOutcome:
    """Build the trainer, fit it, and summarise the result (raises if training failed)."""
    name = run_name or default_run_name(cfg)
    return outcome_from_result(build_trainer(cfg, shard_dir, bases_path, name, resume_from).fit())
